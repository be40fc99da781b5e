/* y = W x (+ b) for one float32 row x: the matrix-vector product of decoding at batch 1.
 *
 * W is (out, in) row-major, nn.Linear's layout, read in place. Rows are shared out over
 * OpenMP threads (with GCC, the libgomp torch has already loaded where torch bundles it under
 * the same soname, as its Linux wheels do: one thread pool; another OpenMP runtime would
 * compete with torch's for the cores, which costs speed, never correctness), four
 * rows at a time so each 16-float load of x serves four weight streams. Built and loaded by
 * minigpt/cpu_gemv.py; its reference is F.linear (tests/test_cpu_gemv.py). */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

static inline __m512 load_tail(const float *p, int64_t n) {
    return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p);
}

/* Four rows from `first`: four accumulators kept in registers. */
static void four_rows(const float *w, const float *x, const float *b, float *y, int64_t first, int64_t in) {
    const float *w0 = w + first * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t full = in & ~(int64_t)15;
    for (int64_t i = 0; i < full; i += 16) {
        __m512 xv = _mm512_loadu_ps(x + i);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + i), xv, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + i), xv, a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + i), xv, a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + i), xv, a3);
    }
    if (full < in) {
        int64_t n = in - full;
        __m512 xv = load_tail(x + full, n);
        a0 = _mm512_fmadd_ps(load_tail(w0 + full, n), xv, a0);
        a1 = _mm512_fmadd_ps(load_tail(w1 + full, n), xv, a1);
        a2 = _mm512_fmadd_ps(load_tail(w2 + full, n), xv, a2);
        a3 = _mm512_fmadd_ps(load_tail(w3 + full, n), xv, a3);
    }
    y[first] = _mm512_reduce_add_ps(a0) + (b ? b[first] : 0.0f);
    y[first + 1] = _mm512_reduce_add_ps(a1) + (b ? b[first + 1] : 0.0f);
    y[first + 2] = _mm512_reduce_add_ps(a2) + (b ? b[first + 2] : 0.0f);
    y[first + 3] = _mm512_reduce_add_ps(a3) + (b ? b[first + 3] : 0.0f);
}

/* One row (the last out % 4 rows). */
static void one_row(const float *w, const float *x, const float *b, float *y, int64_t row, int64_t in) {
    const float *wr = w + row * in;
    __m512 a = _mm512_setzero_ps();
    int64_t full = in & ~(int64_t)15;
    for (int64_t i = 0; i < full; i += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(wr + i), _mm512_loadu_ps(x + i), a);
    if (full < in) a = _mm512_fmadd_ps(load_tail(wr + full, in - full), load_tail(x + full, in - full), a);
    y[row] = _mm512_reduce_add_ps(a) + (b ? b[row] : 0.0f);
}

void minigpt_gemv_f32(const float *w, const float *x, const float *b, float *y, int64_t out, int64_t in, int threads) {
    int64_t groups = (out + 3) / 4;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        int64_t first = g * 4;
        if (first + 4 <= out) four_rows(w, x, b, y, first, in);
        else for (int64_t r = first; r < out; r++) one_row(w, x, b, y, r, in);
    }
}
