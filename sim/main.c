/* kvsim — command-line front end. */
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "--help")) {
        printf("usage: kvsim COMMAND ...\n");
        return argc < 2 ? 2 : 0;
    }
    fprintf(stderr, "kvsim: unknown command '%s'\n", argv[1]);
    return 2;
}
