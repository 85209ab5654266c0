/* Loading a dataset folder (see dataset.h for the layout) and standardising it. */
#include "dataset.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "util.h"

enum { MAX_VIEWS = 1024, MAX_CLASSES = 100000 };

/* ------------------------------------------------------------------ CSV */

/* A numeric CSV file: rows of cells (NaN for "nan" and empty cells). */
typedef struct {
    const char *path;  /* for messages */
    int rows;
    long *line;        /* [rows] physical line number of each row (1-based) */
    size_t *off;       /* [rows + 1] first cell of each row in v */
    float *v;
    long tokens;       /* the value of a first line "#tokens=S", 0 if none */
} csv;

static int cells_of(const csv *t, int row) { return (int)(t->off[row + 1] - t->off[row]); }

static char *trim(char *s, char **end)
{
    while (s < *end && isspace((unsigned char)*s))
        s++;
    while (*end > s && isspace((unsigned char)(*end)[-1]))
        (*end)--;
    return s;
}

/* Parses the cell [s, e) into *out; exits with a message naming file, line and column. */
static float parse_cell(const csv *t, long line, int column, char *s, char *e)
{
    s = trim(s, &e);
    if (s == e)
        return NAN;
    char saved = *e;
    *e = '\0';
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end != e || end == s) {
        char shown[48];
        snprintf(shown, sizeof shown, "%s", s);
        if (strlen(s) >= sizeof shown)
            strcpy(shown + sizeof shown - 4, "...");
        die_input(t->path, line, "column %d: '%s' is not a number", column, shown);
    }
    *e = saved;
    if (isnan(v))
        return NAN;
    if (isinf(v) || fabs(v) > 3.0e38)
        die_input(t->path, line, "column %d: value out of range (infinite or beyond float)", column);
    return (float)v;
}

static void csv_read(const char *path, int allow_tokens_header, csv *t)
{
    memset(t, 0, sizeof *t);
    t->path = path;
    FILE *f = fopen(path, "r");
    if (!f)
        die_input(path, 0, "cannot open: %s", strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode))
        die_input(path, 0, "is a folder, not a CSV file");
    size_t cap_rows = 1024, cap_v = 1 << 16, n_v = 0;
    t->line = xmalloc(cap_rows * sizeof *t->line);
    t->off = xmalloc((cap_rows + 1) * sizeof *t->off);
    t->v = xmalloc(cap_v * sizeof *t->v);
    t->off[0] = 0;
    char *buf = NULL;
    size_t buf_cap = 0;
    ssize_t len;
    long line = 0;
    while ((len = getline(&buf, &buf_cap, f)) != -1) {
        line++;
        char *s = buf, *e = buf + len;
        s = trim(s, &e);
        if (s < e && *s == '#') {
            if (line == 1 && allow_tokens_header && strncmp(s, "#tokens=", 8) == 0) {
                *e = '\0';
                char *end;
                errno = 0;
                long v = strtol(s + 8, &end, 10);
                if (errno || end == s + 8 || *end || v < 1 || v > 1000000)
                    die_input(path, line, "'%s': the header must be '#tokens=S' with an integer S >= 1", s);
                t->tokens = v;
                continue;
            }
            die_input(path, line,
                      allow_tokens_header ? "unexpected '#' line (only a first line '#tokens=S' is allowed)"
                                          : "unexpected '#' line (no header or comment lines allowed)");
        }
        if ((size_t)t->rows == cap_rows) {
            cap_rows *= 2;
            t->line = xrealloc(t->line, cap_rows * sizeof *t->line);
            t->off = xrealloc(t->off, (cap_rows + 1) * sizeof *t->off);
        }
        if (s < e) {
            int column = 1;
            for (;;) {
                char *comma = memchr(s, ',', (size_t)(e - s));
                char *cell_end = comma ? comma : e;
                if (n_v == cap_v) {
                    cap_v *= 2;
                    t->v = xrealloc(t->v, cap_v * sizeof *t->v);
                }
                t->v[n_v++] = parse_cell(t, line, column, s, cell_end);
                if (!comma)
                    break;
                s = comma + 1;
                column++;
            }
        }
        t->line[t->rows] = line;
        t->rows++;
        t->off[t->rows] = n_v;
    }
    if (ferror(f))
        die_input(path, 0, "read error: %s", strerror(errno));
    free(buf);
    fclose(f);
}

static void csv_free(csv *t)
{
    free(t->line);
    free(t->off);
    free(t->v);
    memset(t, 0, sizeof *t);
}

/* ------------------------------------------------------------------ folder */

typedef struct {
    long index;
    char *name;
} view_file;

static int cmp_view_file(const void *a, const void *b)
{
    const view_file *x = a, *y = b;
    return x->index < y->index ? -1 : x->index > y->index;
}

static int ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* "view<i>_<name>.csv" -> i, or -1 for another name. */
static long view_index(const char *name)
{
    if (strncmp(name, "view", 4) != 0 || !ends_with(name, ".csv"))
        return -1;
    const char *p = name + 4;
    if (!isdigit((unsigned char)*p))
        return -1;
    long i = 0;
    while (isdigit((unsigned char)*p) && i <= MAX_VIEWS)
        i = i * 10 + (*p++ - '0');
    if (*p != '_' || strlen(p) < strlen("_x.csv")) /* a non-empty <name> */
        return -1;
    return i;
}

static void load_labels(dataset *ds, const char *path)
{
    csv t;
    csv_read(path, 0, &t);
    if (t.rows == 0)
        die_input(path, 0, "is empty (one 0-based integer class per line expected)");
    ds->n = t.rows;
    ds->label = xmalloc((size_t)t.rows * sizeof *ds->label);
    int max = -1;
    for (int i = 0; i < t.rows; i++) {
        int c = cells_of(&t, i);
        if (c == 0)
            die_input(path, t.line[i], "empty line (one 0-based integer class per line expected)");
        if (c > 1)
            die_input(path, t.line[i],
                      "%d values: multi-label rows are not supported (one 0-based integer class per line)", c);
        float v = t.v[t.off[i]];
        if (isnan(v) || v != floorf(v) || v < 0.0f || v >= (float)MAX_CLASSES)
            die_input(path, t.line[i], "'%g' is not a class (a 0-based integer below %d expected)", (double)v,
                      MAX_CLASSES);
        ds->label[i] = (int32_t)v;
        if (ds->label[i] > max)
            max = ds->label[i];
    }
    ds->n_classes = max + 1;
    int *count = xcalloc((size_t)ds->n_classes, sizeof *count);
    for (int i = 0; i < ds->n; i++)
        count[ds->label[i]]++;
    int distinct = 0;
    for (int c = 0; c < ds->n_classes; c++)
        distinct += count[c] > 0;
    if (distinct < 2)
        die_input(path, 0, "holds a single class (%d); classification needs at least two", max);
    if (distinct < ds->n_classes)
        warn("%s: %d of the classes 0..%d have no sample", path, ds->n_classes - distinct, ds->n_classes - 1);
    free(count);
    csv_free(&t);
}

static void load_split(dataset *ds, const char *path)
{
    csv t;
    csv_read(path, 0, &t);
    if (t.rows != ds->n)
        die_input(path, t.rows > ds->n ? t.line[ds->n] : 0, "%d rows, but labels.csv has %d", t.rows, ds->n);
    ds->split = xmalloc((size_t)ds->n);
    for (int i = 0; i < ds->n; i++) {
        if (cells_of(&t, i) != 1)
            die_input(path, t.line[i], "%d values, expected one 0 (train) or 1 (test)", cells_of(&t, i));
        float v = t.v[t.off[i]];
        if (v != 0.0f && v != 1.0f)
            die_input(path, t.line[i], "'%g' is not 0 (train) or 1 (test)", (double)v);
        ds->split[i] = (int8_t)v;
    }
    csv_free(&t);
}

static void load_avail(dataset *ds, const char *path)
{
    csv t;
    csv_read(path, 0, &t);
    if (t.rows != ds->n)
        die_input(path, t.rows > ds->n ? t.line[ds->n] : 0, "%d rows, but labels.csv has %d", t.rows, ds->n);
    for (int i = 0; i < ds->n; i++) {
        if (cells_of(&t, i) != ds->m)
            die_input(path, t.line[i], "%d values, expected %d (one 0/1 per view)", cells_of(&t, i), ds->m);
        for (int m = 0; m < ds->m; m++) {
            float v = t.v[t.off[i] + (size_t)m];
            if (v != 0.0f && v != 1.0f)
                die_input(path, t.line[i], "column %d: '%g' is not 0 (missing) or 1 (present)", m + 1, (double)v);
            ds->natural[(size_t)i * ds->m + m] = (uint8_t)v;
        }
    }
    csv_free(&t);
}

static void load_view(dataset *ds, int m, const char *path)
{
    csv t;
    csv_read(path, 1, &t);
    ds_view *v = &ds->views[m];
    const int64_t S = t.tokens > 0 ? t.tokens : 1;
    v->tokens = S;
    /* ds->tokens: the common S, or 0 once two views differ. */
    if (m == 0)
        ds->tokens = S;
    else if (S != ds->tokens)
        ds->tokens = 0;
    if (t.rows != ds->n)
        die_input(path, t.rows > ds->n ? t.line[ds->n] : 0, "%d rows, but labels.csv has %d", t.rows, ds->n);
    int width = 0, width_row = -1;
    for (int i = 0; i < t.rows && width_row < 0; i++)
        if (cells_of(&t, i) > 0) {
            width = cells_of(&t, i);
            width_row = i;
        }
    if (width_row < 0)
        die_input(path, 0, "every row is empty");
    if (width % S != 0)
        die_input(path, t.line[width_row], "%d values per row is not a multiple of #tokens=%" PRId64, width, S);
    v->features = width / S;
    v->x = xmalloc((size_t)ds->n * (size_t)width * sizeof *v->x);
    for (int i = 0; i < ds->n; i++) {
        const int c = cells_of(&t, i);
        float *dst = v->x + (size_t)i * (size_t)width;
        if (c == 0) {
            for (int j = 0; j < width; j++)
                dst[j] = NAN;
            ds->natural[(size_t)i * ds->m + m] = 0;
            continue;
        }
        if (c != width)
            die_input(path, t.line[i], "%d values, expected %d (as on line %ld)", c, width, t.line[width_row]);
        const float *src = t.v + t.off[i];
        int nan = 0;
        for (int j = 0; j < width; j++) {
            dst[j] = src[j];
            nan += isnan(src[j]) != 0;
        }
        if (nan == width)
            ds->natural[(size_t)i * ds->m + m] = 0;
    }
    csv_free(&t);
}

void dataset_load(const char *dir, dataset *ds)
{
    memset(ds, 0, sizeof *ds);
    ds->dir = xstrdup(dir);
    DIR *d = opendir(dir);
    if (!d)
        die_input(dir, 0, "cannot open the data folder: %s", strerror(errno));
    view_file *views = NULL;
    int n_views = 0, cap_views = 0;
    char *split = NULL;
    int has_labels = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        const char *name = e->d_name;
        if (name[0] == '.')
            continue;
        if (strcmp(name, "labels.csv") == 0) {
            has_labels = 1;
        } else if (strcmp(name, "avail.csv") == 0) {
            ds->has_avail = 1;
        } else if (strncmp(name, "split", 5) == 0 && ends_with(name, ".csv")) {
            if (split) {
                char *p = path_join(dir, name);
                die_input(p, 0, "a second split file (besides %s): keep one split*.csv", split);
            }
            split = xstrdup(name);
        } else if (strncmp(name, "view", 4) == 0 && ends_with(name, ".csv")) {
            long i = view_index(name);
            if (i < 0 || i >= MAX_VIEWS) {
                warn("%s/%s: not a view<i>_<name>.csv file name, ignored", dir, name);
                continue;
            }
            for (int j = 0; j < n_views; j++)
                if (views[j].index == i) {
                    char *p = path_join(dir, name);
                    die_input(p, 0, "a second view%ld file (besides %s)", i, views[j].name);
                }
            if (n_views == cap_views) {
                cap_views = cap_views ? 2 * cap_views : 8;
                views = xrealloc(views, (size_t)cap_views * sizeof *views);
            }
            views[n_views].index = i;
            views[n_views].name = xstrdup(name);
            n_views++;
        }
    }
    closedir(d);

    char *labels_path = path_join(dir, "labels.csv");
    if (!has_labels)
        die_input(labels_path, 0, "missing (a data folder needs labels.csv, one class per line)");
    if (n_views == 0)
        die_input(dir, 0, "no view files (view0_<name>.csv, view1_<name>.csv, ...)");
    qsort(views, (size_t)n_views, sizeof *views, cmp_view_file);
    for (int j = 0; j < n_views; j++)
        if (views[j].index != j)
            die_input(dir, 0, "no view%d_<name>.csv, but %s exists: views must be numbered 0..M-1 without gaps", j,
                      views[j].name);

    load_labels(ds, labels_path);
    free(labels_path);
    ds->m = n_views;
    ds->natural = xmalloc((size_t)ds->n * (size_t)ds->m);
    memset(ds->natural, 1, (size_t)ds->n * (size_t)ds->m);
    if (split) {
        char *p = path_join(dir, split);
        load_split(ds, p);
        free(p);
        ds->split_name = split;
    }
    if (ds->has_avail) {
        char *p = path_join(dir, "avail.csv");
        load_avail(ds, p);
        free(p);
    }
    ds->views = xcalloc((size_t)ds->m, sizeof *ds->views);
    for (int m = 0; m < ds->m; m++) {
        char *p = path_join(dir, views[m].name);
        load_view(ds, m, p);
        free(p);
        ds->views[m].name = views[m].name;
    }
    free(views);
    for (int i = 0; i < ds->n; i++)
        for (int m = 0; m < ds->m; m++) {
            if (!ds->natural[(size_t)i * ds->m + m]) {
                ds->natural_missing++;
                continue;
            }
            const int64_t w = ds->views[m].tokens * ds->views[m].features;
            const float *x = ds->views[m].x + (size_t)i * (size_t)w;
            for (int64_t j = 0; j < w; j++)
                ds->nan_cells += isnan(x[j]) != 0;
        }
}

void dataset_free(dataset *ds)
{
    for (int m = 0; m < ds->m && ds->views; m++) {
        free(ds->views[m].name);
        free(ds->views[m].x);
    }
    free(ds->views);
    free(ds->dir);
    free(ds->label);
    free(ds->split_name);
    free(ds->split);
    free(ds->natural);
    memset(ds, 0, sizeof *ds);
}

/* ------------------------------------------------------------------ standardisation */

void dataset_standardise(dataset *ds, const uint8_t *mask, const int *train, int n_train)
{
    for (int m = 0; m < ds->m; m++) {
        ds_view *v = &ds->views[m];
        const int64_t F = v->features, w = v->tokens * F;
        double *sum = xcalloc((size_t)F, sizeof *sum), *sq = xcalloc((size_t)F, sizeof *sq);
        int64_t *cnt = xcalloc((size_t)F, sizeof *cnt);
        /* Two passes (mean, then squared deviations) for accuracy on large offsets. */
        for (int t = 0; t < n_train; t++) {
            const int i = train[t];
            if (!mask[(size_t)i * ds->m + m])
                continue;
            const float *x = v->x + (size_t)i * (size_t)w;
            for (int64_t j = 0; j < w; j++)
                if (!isnan(x[j])) {
                    sum[j % F] += x[j];
                    cnt[j % F]++;
                }
        }
        for (int64_t f = 0; f < F; f++)
            sum[f] = cnt[f] > 0 ? sum[f] / (double)cnt[f] : 0.0;
        for (int t = 0; t < n_train; t++) {
            const int i = train[t];
            if (!mask[(size_t)i * ds->m + m])
                continue;
            const float *x = v->x + (size_t)i * (size_t)w;
            for (int64_t j = 0; j < w; j++)
                if (!isnan(x[j])) {
                    const double dv = x[j] - sum[j % F];
                    sq[j % F] += dv * dv;
                }
        }
        for (int64_t f = 0; f < F; f++) {
            const double sd = cnt[f] > 0 ? sqrt(sq[f] / (double)cnt[f]) : 1.0;
            sq[f] = sd < 1e-8 ? 1.0 : sd;
        }
        for (int i = 0; i < ds->n; i++) {
            float *x = v->x + (size_t)i * (size_t)w;
            if (!mask[(size_t)i * ds->m + m]) {
                memset(x, 0, (size_t)w * sizeof *x);
                continue;
            }
            /* Clamped: a row outside the train rows can lie far beyond their spread, and
             * would otherwise become Inf, which the library rejects (found by tests/fuzz). */
            for (int64_t j = 0; j < w; j++)
                x[j] = isnan(x[j]) ? 0.0f : (float)fmax(-FLT_MAX, fmin(FLT_MAX, (x[j] - sum[j % F]) / sq[j % F]));
        }
        free(sum);
        free(sq);
        free(cnt);
    }
}
