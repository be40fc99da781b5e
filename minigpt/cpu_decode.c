/* Decoding at batch 1 on an AVX-512 CPU: a float32 matrix-vector product, and one whole
 * pre-norm GPT block for one token, each in one call.
 *
 * Why a block in C: a decoded token reads every weight once, and the products already stream
 * at the memory's speed; what is left is the ~20 small operators per block between them
 * (LayerNorm, the KV cache's writes, attention over one query, GELU, adds), each a torch call
 * of 3-30 us with its Python around it: 0.2 ms per block on the development VM, a quarter of
 * a GPT-2 124M token (benchmarks/NOTES.md). Here the block is one call and one OpenMP
 * parallel region whose threads share each product's rows and the attention's heads.
 *
 * W is (out, in) row-major, nn.Linear's layout, read in place. The rows of a product are cut
 * into one contiguous share per thread (whole vectors of 16, for the epilogues); each row's
 * sum is one thread's work in a fixed order, so the thread count never changes a bit. With
 * GCC the OpenMP runtime is the libgomp torch has already loaded where torch bundles it under
 * the same soname, as its Linux wheels do: one thread pool. Built and loaded by
 * minigpt/cpu_decode.py; the references are F.linear and minigpt.model.Block
 * (tests/test_cpu_decode.py). */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>

enum { ACT_NONE = 0, ACT_GELU_ERF = 1, ACT_GELU_TANH = 2 };

static inline __mmask16 first_lanes(int64_t n) { return (__mmask16)((1u << (n < 16 ? n : 16)) - 1u); }
static inline __m512 load_tail(const float *p, int64_t n) { return _mm512_maskz_loadu_ps(first_lanes(n), p); }

/* e^x for 16 floats (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, 2^n by scalef);
 * about 1 ulp. Inputs are clamped to [-88, 88.7], where the float32 result is finite. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.7f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* GELU of 16 floats. tanh form: 0.5 u (1 + tanh(a)) = u / (1 + e^(-2a)), a = sqrt(2/pi)(u + 0.044715 u^3).
 * erf form: 0.5 u (1 + erf(u / sqrt 2)) with erfc(|z|) from Numerical Recipes' Chebyshev fit
 * (relative error under 1.2e-7), so that the negative side keeps its relative precision. */
static inline __m512 gelu16(__m512 u, int act) {
    const __m512 one = _mm512_set1_ps(1.0f);
    if (act == ACT_GELU_TANH) {
        __m512 a = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                 _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), u), _mm512_mul_ps(u, u), u));
        return _mm512_div_ps(u, _mm512_add_ps(one, exp16(_mm512_mul_ps(_mm512_set1_ps(-2.0f), a))));
    }
    __m512 z = _mm512_abs_ps(_mm512_mul_ps(u, _mm512_set1_ps(0.7071067811865476f)));
    __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.5f), z, one));
    static const float c[] = {0.17087277f, -0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f,
                              -0.18628806f, 0.09678418f, 0.37409196f, 1.00002368f, -1.26551223f};
    __m512 poly = _mm512_set1_ps(c[0]);
    for (int i = 1; i < 10; i++) poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(c[i]));
    __m512 erfc = _mm512_mul_ps(t, exp16(_mm512_sub_ps(poly, _mm512_mul_ps(z, z))));
    __mmask16 positive = _mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_GE_OQ);
    __m512 one_plus_erf = _mm512_mask_sub_ps(erfc, positive, _mm512_set1_ps(2.0f), erfc);
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), u), one_plus_erf);
}

/* y[r] = res[r] + (w_r . x + b[r]) for one row; b and res may be NULL. */
static inline float finish(__m512 acc, const float *b, const float *res, int64_t r) {
    float v = _mm512_reduce_add_ps(acc) + (b ? b[r] : 0.0f);
    return res ? res[r] + v : v;
}

/* Four rows from `first`: four accumulators in registers, so each load of x serves four
 * weight streams. res may alias y (each element is read before it is written). */
static void four_rows(const float *w, const float *x, const float *b, const float *res, float *y,
                      int64_t first, int64_t in) {
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
    y[first] = finish(a0, b, res, first);
    y[first + 1] = finish(a1, b, res, first + 1);
    y[first + 2] = finish(a2, b, res, first + 2);
    y[first + 3] = finish(a3, b, res, first + 3);
}

static void one_row(const float *w, const float *x, const float *b, const float *res, float *y, int64_t row, int64_t in) {
    const float *wr = w + row * in;
    __m512 a = _mm512_setzero_ps();
    int64_t full = in & ~(int64_t)15;
    for (int64_t i = 0; i < full; i += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(wr + i), _mm512_loadu_ps(x + i), a);
    if (full < in) a = _mm512_fmadd_ps(load_tail(wr + full, in - full), load_tail(x + full, in - full), a);
    y[row] = finish(a, b, res, row);
}

/* This thread's share of a product's rows, [lo, hi): contiguous, whole vectors of 16 each.
 * Outside a parallel region the caller is the only thread and takes them all. */
static void my_rows(int64_t out, int64_t *lo, int64_t *hi) {
    int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
    int64_t share = (out + 16 * threads - 1) / (16 * threads) * 16;
    *lo = me * share < out ? me * share : out;
    *hi = *lo + share < out ? *lo + share : out;
}

/* The calling thread's share of y = act(W x + b) (+ res): call it from every thread of a
 * parallel region; no barrier at the end. */
static void product_share(const float *w, const float *x, const float *b, const float *res, float *y,
                          int64_t out, int64_t in, int act) {
    int64_t lo, hi, r;
    my_rows(out, &lo, &hi);
    for (r = lo; r + 4 <= hi; r += 4) four_rows(w, x, b, res, y, r, in);
    for (; r < hi; r++) one_row(w, x, b, res, y, r, in);
    if (act != ACT_NONE)
        for (r = lo; r < hi; r += 16) {
            __mmask16 m = first_lanes(hi - r);
            _mm512_mask_storeu_ps(y + r, m, gelu16(_mm512_maskz_loadu_ps(m, y + r), act));
        }
}

void minigpt_gemv_f32(const float *w, const float *x, const float *b, float *y, int64_t out, int64_t in, int threads) {
    #pragma omp parallel num_threads(threads)
    product_share(w, x, b, NULL, y, out, in, ACT_NONE);
}

static float sum16(const float *x, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) acc = _mm512_add_ps(acc, load_tail(x + i, n - i));
    return _mm512_reduce_add_ps(acc);
}

/* y = (x - mean) / sqrt(var + eps) * g + b over one row of n (b may be NULL). */
static void layer_norm(const float *x, const float *g, const float *b, float *y, int64_t n, float eps) {
    float mean = sum16(x, n) / (float)n;
    __m512 acc = _mm512_setzero_ps(), mv = _mm512_set1_ps(mean);
    for (int64_t i = 0; i < n; i += 16) {
        __m512 d = _mm512_maskz_sub_ps(first_lanes(n - i), load_tail(x + i, n - i), mv);
        acc = _mm512_fmadd_ps(d, d, acc);
    }
    __m512 rstd = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)n + eps));
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = first_lanes(n - i);
        __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(load_tail(x + i, n - i), mv), rstd), load_tail(g + i, n - i));
        if (b) v = _mm512_add_ps(v, load_tail(b + i, n - i));
        _mm512_mask_storeu_ps(y + i, m, v);
    }
}

static float dot16(const float *a, const float *b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(load_tail(a + i, n - i), load_tail(b + i, n - i), acc);
    return _mm512_reduce_add_ps(acc);
}

/* One head of one query: store its key and value in cache slot `slot`, then softmax over the
 * `count` filled slots (every one visible: a dense layer's slots are tokens 0..count-1, a
 * banded layer's ring holds only its window, in any order) and the weighted sum of values. */
static void attend(const float *q, const float *k_new, const float *v_new, float *k, float *v, float *scores,
                   float *z, int64_t slot, int64_t count, int64_t d, float scale) {
    for (int64_t i = 0; i < d; i++) { k[slot * d + i] = k_new[i]; v[slot * d + i] = v_new[i]; }
    float top = -INFINITY;
    for (int64_t j = 0; j < count; j++) {
        scores[j] = scale * dot16(q, k + j * d, d);
        top = scores[j] > top ? scores[j] : top;
    }
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < count; j += 16) {
        __mmask16 m = first_lanes(count - j);
        __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(load_tail(scores + j, count - j), _mm512_set1_ps(top))));
        _mm512_mask_storeu_ps(scores + j, m, e);
        total = _mm512_add_ps(total, e);
    }
    float inverse = 1.0f / _mm512_reduce_add_ps(total);
    for (int64_t i = 0; i < d; i += 16) {
        __mmask16 m = first_lanes(d - i);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < count; j++)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[j]), _mm512_maskz_loadu_ps(m, v + j * d + i), acc);
        _mm512_mask_storeu_ps(z + i, m, _mm512_mul_ps(acc, _mm512_set1_ps(inverse)));
    }
}

/* A block's weights (NULL for a bias it does not have) and shape; minigpt/cpu_decode.py
 * declares the same fields in the same order. */
typedef struct {
    const float *ln1_w, *ln1_b, *qkv_w, *qkv_b, *attn_proj_w, *attn_proj_b;
    const float *ln2_w, *ln2_b, *fc_w, *fc_b, *mlp_proj_w, *mlp_proj_b;
    int64_t n_embd, n_head, mlp_width, activation;
    float eps, scale;
} MinigptBlock;

/* out = x + attn(ln_1(x)); out += mlp(ln_2(out)) for one token x (n_embd,). k and v are the
 * layer's cache, (n_head, capacity, head_dim); the token's key and value go to `slot`, and
 * its query sees slots 0..count-1. scratch holds 5 n_embd + mlp_width + n_head * capacity floats. */
void minigpt_decode_block(const MinigptBlock *p, const float *x, float *out, float *k, float *v, int64_t capacity,
                          int64_t slot, int64_t count, float *scratch, int threads) {
    const int64_t C = p->n_embd, H = p->n_head, D = C / H, F = p->mlp_width;
    float *h = scratch, *qkv = h + C, *z = qkv + 3 * C, *u = z + C, *scores = u + F;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp single
        layer_norm(x, p->ln1_w, p->ln1_b, h, C, p->eps);
        product_share(p->qkv_w, h, p->qkv_b, NULL, qkv, 3 * C, C, ACT_NONE);
        #pragma omp barrier
        #pragma omp for schedule(static)
        for (int64_t head = 0; head < H; head++)
            attend(qkv + head * D, qkv + C + head * D, qkv + 2 * C + head * D, k + head * capacity * D,
                   v + head * capacity * D, scores + head * capacity, z + head * D, slot, count, D, p->scale);
        product_share(p->attn_proj_w, z, p->attn_proj_b, x, out, C, C, ACT_NONE);
        #pragma omp barrier
        #pragma omp single
        layer_norm(out, p->ln2_w, p->ln2_b, h, C, p->eps);
        product_share(p->fc_w, h, p->fc_b, NULL, u, F, C, (int)p->activation);
        #pragma omp barrier
        product_share(p->mlp_proj_w, u, p->mlp_proj_b, out, out, C, F, ACT_NONE);
    }
}
