/* args.h — the option parser of kvsim's subcommands: `--name value` or `--name=value`, typed and
 * range-checked from a table, with positional arguments collected in order. Errors are one
 * line naming the command and the option. */
#ifndef KVSIM_ARGS_H
#define KVSIM_ARGS_H

#include <stdio.h>

#include "sim/base/util.h"

typedef enum { ARG_INT, ARG_DOUBLE, ARG_STRING, ARG_CHOICE, ARG_FLAG, ARG_STRINGS } ArgKind;

/* The values of an option that may be repeated (ARG_STRINGS), in the order given. */
enum { ARG_STRINGS_MAX = 4096 };
typedef struct {
    int n;
    const char *v[ARG_STRINGS_MAX];
} ArgStrings;

typedef struct {
    const char *name;    /* without the leading "--" */
    ArgKind kind;        /* int -> int*, double -> double*, string -> const char**, choice -> int*,
                            flag (takes no value; present = 1) -> int*,
                            strings (repeatable, each occurrence appended) -> ArgStrings* */
    void *out;           /* keeps its value when the option is absent (the default) */
    double min, max;     /* inclusive range for int and double */
    const char *choices; /* choice: "a|b|c", stored as the index */
    const char *help;    /* one line for usage */
} ArgSpec;

/* Parses argv[1..argc-1] (argv[0] is the command name). Positional arguments go to
 * positional[0..max_positional-1], their count to *n_positional. Returns 0, 1 when --help or
 * -h was given (nothing else is checked then), or -1 with a message. Specs end with name NULL. */
int args_parse(int argc, char **argv, const ArgSpec *specs, const char **positional,
               int max_positional, int *n_positional, KvErr *err);

/* Prints "usage: kvsim <usage_line>" and one line per option with its default. */
void args_usage(FILE *out, const char *usage_line, const ArgSpec *specs);

/* The start of every subcommand: parses, prints the usage for --help, prints a parse error as
 * one line on stderr, and checks that exactly n_positional_wanted positional arguments came
 * (n_positional_wanted of them at most are stored). Returns -1 to go on, otherwise the exit
 * status the command should return (0 after --help, 2 after an error). */
int args_start(int argc, char **argv, const ArgSpec *specs, const char *usage_line,
               const char **positional, int n_positional_wanted);

#endif
