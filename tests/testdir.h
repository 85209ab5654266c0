/* Folder clean-up shared by the Check tests (through testutil.h) and the fuzzers: plain C,
 * neither Check nor the library, since the fuzzers link neither everywhere. */
#ifndef CONFSMOE_TESTDIR_H
#define CONFSMOE_TESTDIR_H

#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* Removes what dir holds: files, and folders down to depth levels below it (emptied first).
 * Returns 0 if dir cannot be opened. */
static inline int test_clear_dir(const char *dir, int depth)
{
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        char path[4096];
        if (snprintf(path, sizeof path, "%s/%s", dir, e->d_name) >= (int)sizeof path)
            continue;  /* a truncated path would name another file */
        if (unlink(path) != 0 && depth > 0) {
            test_clear_dir(path, depth - 1);
            rmdir(path);
        }
    }
    closedir(d);
    return 1;
}

#endif /* CONFSMOE_TESTDIR_H */
