/* scratch.h — scratch directories for tests that write files, and running the built kvsim
 * binary (located through $KVSIM_BIN, which CMake sets for every test). Failures fail the
 * calling cmocka test. */
#ifndef KVSIM_TEST_SCRATCH_H
#define KVSIM_TEST_SCRATCH_H

/* A fresh directory under $TMPDIR (or /tmp); free it with scratch_remove. */
char *scratch_create(void);
/* Removes the files in dir, then dir itself, and frees the name. */
void scratch_remove(char *dir);
/* Number of entries in dir besides . and .. */
int scratch_count(const char *dir);
/* dir/name into a static buffer of one of `slot` 0..3 (so up to four can be live at once). */
const char *scratch_path(const char *dir, const char *name, int slot);

typedef struct {
    int status; /* exit status, or -1 when the process did not exit normally */
    char *out;  /* stdout, NUL-terminated */
    char *err;  /* stderr, NUL-terminated */
} KvsimRun;

/* Writes text to path (replacing it); fails the test when it cannot. */
void scratch_write(const char *path, const char *text);

/* Runs a shell command line, capturing its stdout and stderr. */
KvsimRun run_command(const char *cmd);
/* Runs `$KVSIM_BIN args` through the shell (args are inserted verbatim). */
KvsimRun run_kvsim(const char *args);
/* run_kvsim with printf-style arguments; fails the test unless kvsim exits 0. */
KvsimRun run_kvsim_ok(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* run_kvsim(args), expecting exit 2 and exactly one line on stderr containing every further
 * argument (strings, NULL-terminated): kvsim's rule for bad input. */
void run_kvsim_fails(const char *args, ...);
void kvsim_run_free(KvsimRun *r);
/* The whole file as a NUL-terminated string ("" when it cannot be read); free() it. */
char *scratch_read(const char *path);
/* Number of '\n'-terminated lines in s. */
int count_lines(const char *s);

#endif
