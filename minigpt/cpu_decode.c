/* Decoding at batch 1 on an x86-64 CPU with AVX-512 or AVX2 and FMA: a matrix-vector product
 * (float32 or bfloat16 weights), and one whole pre-norm GPT block for one token, each in one call.
 *
 * Why a block in C: a decoded token reads every weight once, and the products already stream
 * at the memory's speed; what is left is the ~20 small operators per block between them
 * (LayerNorm, the KV cache's writes, attention over one query, GELU, adds), each a torch call
 * of 3-30 us with its Python around it: 0.2 ms per block on the development VM, a quarter of
 * a GPT-2 124M token (benchmarks/NOTES.md). Here the block is one call and one OpenMP
 * parallel region whose threads share each product's rows and the attention's heads.
 *
 * A block's weights, its KV cache and its input and output are all float32 or all bfloat16 (a
 * model cast with .to(torch.bfloat16)); in between, everything is float32: bfloat16 values
 * are widened exactly as they are read, and rounded to nearest even, as torch rounds, only
 * where they are stored (the cache's new key and value, the block's output).
 *
 * W is (out, in) row-major, nn.Linear's layout, read in place. The rows of a product are cut
 * into one contiguous share per thread (whole cache lines of 16 outputs, for the epilogues);
 * each row's sum is one thread's work in a fixed order, so the thread count never changes a
 * bit. With GCC the OpenMP runtime is the libgomp torch has already loaded where torch bundles
 * it under the same soname, as its Linux wheels do: one thread pool. Built and loaded by
 * minigpt/cpu_decode.py, once with -mavx512f... where torch reports AVX-512 and once with
 * -mavx2 -mfma where it reports AVX2 (most laptops: Intel's client chips since 2021 and AMD's
 * before Zen 4 have no AVX-512); the references are F.linear and minigpt.model.Block
 * (tests/test_cpu_decode.py).
 *
 * The vector section below gives the few operations the algorithms use, for both instruction
 * sets; everything after it is written once, LANES floats at a time. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum { ACT_NONE = 0, ACT_GELU_ERF = 1, ACT_GELU_TANH = 2 };
enum { SHARE_GRAIN = 16 };  /* a thread's rows come in whole 64-byte lines of float32 outputs */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* ---- AVX-512: 16 floats, masks in k registers ---- */
enum { LANES = 16 };
typedef __m512 vf;
typedef __mmask16 lanes_t;
static inline lanes_t first_lanes(int64_t n) { return (__mmask16)((1u << (n < 16 ? n : 16)) - 1u); }
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vset(float a) { return _mm512_set1_ps(a); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vabs(vf a) { return _mm512_abs_ps(a); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }   /* a b + c */
static inline vf vfnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); } /* c - a b */
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline vf vround(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vscale2(vf p, vf n) { return _mm512_scalef_ps(p, n); }       /* p 2^n, n whole */
static inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vf load_tail(const float *p, int64_t n) { return _mm512_maskz_loadu_ps(first_lanes(n), p); }
static inline void store_tail(float *p, int64_t n, vf v) { _mm512_mask_storeu_ps(p, first_lanes(n), v); }
static inline vf keep_first(int64_t n, vf v) { return _mm512_maskz_mov_ps(first_lanes(n), v); }
static inline vf sub_keep_first(int64_t n, vf a, vf b) { return _mm512_maskz_sub_ps(first_lanes(n), a, b); }
/* where u >= 0: 2 - e, elsewhere e (GELU's 1 + erf from erfc) */
static inline vf one_plus_erf(vf u, vf e) {
    return _mm512_mask_sub_ps(e, _mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_GE_OQ), _mm512_set1_ps(2.0f), e);
}

/* bfloat16 <-> float32. Widening is exact (the 16 bits become the top of a float32); rounding
 * is to nearest even, NaN kept NaN. Tails of n < 16 values are masked loads and stores. */
static inline __m512 bf16_widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

static inline __m512i bf16_round(__m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

/* Up to 16 values from element i of p (float32 or bfloat16) as float32; lanes past n are 0. */
static inline vf load_any(const void *p, int64_t i, int64_t n, int bf16) {
    if (bf16) return bf16_widen(_mm256_maskz_loadu_epi16(first_lanes(n), (const uint16_t *)p + i));
    return _mm512_maskz_loadu_ps(first_lanes(n), (const float *)p + i);
}

static inline void store_any(void *p, int64_t i, int64_t n, vf v, int bf16) {
    if (bf16) _mm512_mask_cvtepi32_storeu_epi16((uint16_t *)p + i, first_lanes(n), bf16_round(v));
    else _mm512_mask_storeu_ps((float *)p + i, first_lanes(n), v);
}

/* 16 weights from element i, the hot loop's unmasked load. */
static inline __attribute__((always_inline)) vf load_w(const void *w, int64_t i, int bf16) {
    if (bf16) return bf16_widen(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i)));
    return _mm512_loadu_ps((const float *)w + i);
}

#elif defined(__AVX2__) && defined(__FMA__)
/* ---- AVX2 and FMA: 8 floats; a mask is a vector whose first n lanes are all ones ---- */
enum { LANES = 8 };
typedef __m256 vf;
static inline __m256i first_lanes(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 8 ? n : 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vset(float a) { return _mm256_set1_ps(a); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vabs(vf a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vfnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
static inline float vsum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline vf vround(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* p 2^n for whole n in [-127, 128] (exp's range): two factors 2^(n/2) and 2^(n - n/2) built
 * from their exponent bits, each a normal float, so that 2^128 and 2^-127 scale p as
 * AVX-512's scalef does, with one rounding where the result is subnormal. */
static inline vf vscale2(vf p, vf n) {
    __m256i whole = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(whole, 1);
    __m256 a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
    __m256 b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(whole, half),
                                                                      _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, a), b);
}
static inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vf load_tail(const float *p, int64_t n) { return _mm256_maskload_ps(p, first_lanes(n)); }
static inline void store_tail(float *p, int64_t n, vf v) { _mm256_maskstore_ps(p, first_lanes(n), v); }
static inline vf keep_first(int64_t n, vf v) { return _mm256_and_ps(v, _mm256_castsi256_ps(first_lanes(n))); }
static inline vf sub_keep_first(int64_t n, vf a, vf b) { return keep_first(n, _mm256_sub_ps(a, b)); }
static inline vf one_plus_erf(vf u, vf e) {
    return _mm256_blendv_ps(e, _mm256_sub_ps(_mm256_set1_ps(2.0f), e), _mm256_cmp_ps(u, _mm256_setzero_ps(), _CMP_GE_OQ));
}

/* bfloat16 <-> float32, as above. AVX2 has no 16-bit masked load or store: a tail of n < 8
 * values goes through a small zeroed buffer. */
static inline __m256 bf16_widen(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }

static inline __m128i bf16_round(__m256 v) {
    __m256i bits = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);  /* 0..0xFFFF each: exact */
    return _mm256_castsi256_si128(packed);
}

static inline vf load_any(const void *p, int64_t i, int64_t n, int bf16) {
    if (!bf16) return _mm256_maskload_ps((const float *)p + i, first_lanes(n));
    if (n >= 8) return bf16_widen(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    uint16_t part[8] = {0};
    memcpy(part, (const uint16_t *)p + i, (size_t)n * sizeof *part);
    return bf16_widen(_mm_loadu_si128((const __m128i *)part));
}

static inline void store_any(void *p, int64_t i, int64_t n, vf v, int bf16) {
    if (!bf16) { _mm256_maskstore_ps((float *)p + i, first_lanes(n), v); return; }
    if (n >= 8) { _mm_storeu_si128((__m128i *)((uint16_t *)p + i), bf16_round(v)); return; }
    uint16_t part[8];
    _mm_storeu_si128((__m128i *)part, bf16_round(v));
    memcpy((uint16_t *)p + i, part, (size_t)n * sizeof *part);
}

static inline __attribute__((always_inline)) vf load_w(const void *w, int64_t i, int bf16) {
    if (bf16) return bf16_widen(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
    return _mm256_loadu_ps((const float *)w + i);
}

/* On AVX2 (measured on a Zen 3 EPYC) four rows read side by side stream slower than one row
 * read straight through where a row is short: bfloat16 rows of 768 at 21 against 27 GB/s,
 * float32 rows of 384 at 26 against 29-33 (benchmarks/NOTES.md); from 3 KB on, four rows are
 * as fast or faster. Rows of at most this many bytes are read one at a time. */
#define SHORT_ROW_BYTES 2048

#else
#error "cpu_decode.c needs AVX-512 (F, BW, VL) or AVX2 with FMA"
#endif

/* ---- the algorithms, LANES floats at a time ---- */

/* e^x (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n); about 1 ulp.
 * Inputs are clamped to [-88, 88.7], where the float32 result is finite. */
static inline vf vexp(vf x) {
    x = vmin(vmax(x, vset(-88.0f)), vset(88.7f));
    vf n = vround(vmul(x, vset(1.44269504088896341f)));
    vf r = vfnma(n, vset(0.693359375f), x);
    r = vfnma(n, vset(-2.12194440e-4f), r);
    vf p = vset(1.9875691500e-4f);
    p = vfma(p, r, vset(1.3981999507e-3f));
    p = vfma(p, r, vset(8.3334519073e-3f));
    p = vfma(p, r, vset(4.1665795894e-2f));
    p = vfma(p, r, vset(1.6666665459e-1f));
    p = vfma(p, r, vset(5.0000001201e-1f));
    p = vfma(p, vmul(r, r), vadd(r, vset(1.0f)));
    return vscale2(p, n);
}

/* GELU. tanh form: 0.5 u (1 + tanh(a)) = u / (1 + e^(-2a)), a = sqrt(2/pi)(u + 0.044715 u^3).
 * erf form: 0.5 u (1 + erf(u / sqrt 2)) with erfc(|z|) from Numerical Recipes' Chebyshev fit
 * (relative error under 1.2e-7), so that the negative side keeps its relative precision. */
static inline vf vgelu(vf u, int act) {
    const vf one = vset(1.0f);
    if (act == ACT_GELU_TANH) {
        vf a = vmul(vset(0.7978845608028654f), vfma(vmul(vset(0.044715f), u), vmul(u, u), u));
        return vdiv(u, vadd(one, vexp(vmul(vset(-2.0f), a))));
    }
    vf z = vabs(vmul(u, vset(0.7071067811865476f)));
    vf t = vdiv(one, vfma(vset(0.5f), z, one));
    static const float c[] = {0.17087277f, -0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f,
                              -0.18628806f, 0.09678418f, 0.37409196f, 1.00002368f, -1.26551223f};
    vf poly = vset(c[0]);
    for (int i = 1; i < 10; i++) poly = vfma(poly, t, vset(c[i]));
    vf erfc = vmul(t, vexp(vsub(poly, vmul(z, z))));
    return vmul(vmul(vset(0.5f), u), one_plus_erf(u, erfc));
}

static inline float scalar_any(const void *p, int64_t i, int bf16) {
    if (!bf16) return ((const float *)p)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* y[r] = res[r] + (w_r . x + b[r]) for one row; b and res may be NULL. */
static inline float finish(vf acc, const void *b, const float *res, int64_t r, int bf16) {
    float v = vsum(acc) + (b ? scalar_any(b, r, bf16) : 0.0f);
    return res ? res[r] + v : v;
}

/* Four rows from `first`: four accumulators in registers, so each load of x serves four
 * weight streams. res may alias y (each element is read before it is written). */
static inline __attribute__((always_inline)) void four_rows(const void *w, const float *x, const void *b,
                                                            const float *res, float *y, int64_t first, int64_t in,
                                                            int bf16) {
    int64_t o0 = first * in, o1 = o0 + in, o2 = o1 + in, o3 = o2 + in;
    vf a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    int64_t full = in & ~(int64_t)(LANES - 1);
    for (int64_t i = 0; i < full; i += LANES) {
        vf xv = vload(x + i);
        a0 = vfma(load_w(w, o0 + i, bf16), xv, a0);
        a1 = vfma(load_w(w, o1 + i, bf16), xv, a1);
        a2 = vfma(load_w(w, o2 + i, bf16), xv, a2);
        a3 = vfma(load_w(w, o3 + i, bf16), xv, a3);
    }
    if (full < in) {
        int64_t n = in - full;
        vf xv = load_tail(x + full, n);
        a0 = vfma(load_any(w, o0 + full, n, bf16), xv, a0);
        a1 = vfma(load_any(w, o1 + full, n, bf16), xv, a1);
        a2 = vfma(load_any(w, o2 + full, n, bf16), xv, a2);
        a3 = vfma(load_any(w, o3 + full, n, bf16), xv, a3);
    }
    y[first] = finish(a0, b, res, first, bf16);
    y[first + 1] = finish(a1, b, res, first + 1, bf16);
    y[first + 2] = finish(a2, b, res, first + 2, bf16);
    y[first + 3] = finish(a3, b, res, first + 3, bf16);
}

static inline __attribute__((always_inline)) void one_row(const void *w, const float *x, const void *b,
                                                          const float *res, float *y, int64_t row, int64_t in,
                                                          int bf16) {
    vf a = vzero();
    for (int64_t i = 0; i < in; i += LANES) a = vfma(load_any(w, row * in + i, in - i, bf16), load_tail(x + i, in - i), a);
    y[row] = finish(a, b, res, row, bf16);
}

#ifdef SHORT_ROW_BYTES
/* One row read straight through, four accumulators (added in a fixed order at the end). */
static inline __attribute__((always_inline)) void straight_row(const void *w, const float *x, const void *b,
                                                               const float *res, float *y, int64_t row, int64_t in,
                                                               int bf16) {
    vf a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    int64_t o = row * in, i = 0;
    for (; i + 4 * LANES <= in; i += 4 * LANES) {
        a0 = vfma(load_w(w, o + i, bf16), vload(x + i), a0);
        a1 = vfma(load_w(w, o + i + LANES, bf16), vload(x + i + LANES), a1);
        a2 = vfma(load_w(w, o + i + 2 * LANES, bf16), vload(x + i + 2 * LANES), a2);
        a3 = vfma(load_w(w, o + i + 3 * LANES, bf16), vload(x + i + 3 * LANES), a3);
    }
    for (; i < in; i += LANES) a0 = vfma(load_any(w, o + i, in - i, bf16), load_tail(x + i, in - i), a0);
    y[row] = finish(vadd(vadd(a0, a1), vadd(a2, a3)), b, res, row, bf16);
}
#endif

/* This thread's share of a product's rows, [lo, hi): contiguous, whole lines of SHARE_GRAIN.
 * Outside a parallel region the caller is the only thread and takes them all. */
static void my_rows(int64_t out, int64_t *lo, int64_t *hi) {
    int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
    int64_t share = (out + SHARE_GRAIN * threads - 1) / (SHARE_GRAIN * threads) * SHARE_GRAIN;
    *lo = me * share < out ? me * share : out;
    *hi = *lo + share < out ? *lo + share : out;
}

static inline __attribute__((always_inline)) void rows_of(const void *w, const float *x, const void *b,
                                                          const float *res, float *y, int64_t lo, int64_t hi,
                                                          int64_t in, int bf16) {
    int64_t r;
#ifdef SHORT_ROW_BYTES
    if (in * (bf16 ? 2 : 4) <= SHORT_ROW_BYTES) {
        for (r = lo; r < hi; r++) straight_row(w, x, b, res, y, r, in, bf16);
        return;
    }
#endif
    for (r = lo; r + 4 <= hi; r += 4) four_rows(w, x, b, res, y, r, in, bf16);
    for (; r < hi; r++) one_row(w, x, b, res, y, r, in, bf16);
}

/* The calling thread's share of y = act(W x + b) (+ res), W and b float32 or bfloat16, x, res
 * and y float32: call it from every thread of a parallel region; no barrier at the end. */
static void product_share(const void *w, const float *x, const void *b, const float *res, float *y,
                          int64_t out, int64_t in, int act, int bf16) {
    int64_t lo, hi;
    my_rows(out, &lo, &hi);
    if (bf16) rows_of(w, x, b, res, y, lo, hi, in, 1);  /* two copies of the loop, one per dtype */
    else rows_of(w, x, b, res, y, lo, hi, in, 0);
    if (act != ACT_NONE)
        for (int64_t r = lo; r < hi; r += LANES) store_tail(y + r, hi - r, vgelu(load_tail(y + r, hi - r), act));
}

/* y = W x + b for one row: W (out, in) and b float32 or bfloat16 (b may be NULL), x and y float32. */
void minigpt_gemv(const void *w, const float *x, const void *b, float *y, int64_t out, int64_t in, int threads,
                  int bf16) {
    #pragma omp parallel num_threads(threads)
    product_share(w, x, b, NULL, y, out, in, ACT_NONE, bf16);
}

static float sum_of(const float *x, int64_t n) {
    vf acc = vzero();
    for (int64_t i = 0; i < n; i += LANES) acc = vadd(acc, load_tail(x + i, n - i));
    return vsum(acc);
}

/* y = (x - mean) / sqrt(var + eps) * g + b over one row of n (b may be NULL; g and b float32
 * or bfloat16). */
static void layer_norm(const float *x, const void *g, const void *b, float *y, int64_t n, float eps, int bf16) {
    float mean = sum_of(x, n) / (float)n;
    vf acc = vzero(), mv = vset(mean);
    for (int64_t i = 0; i < n; i += LANES) {
        vf d = sub_keep_first(n - i, load_tail(x + i, n - i), mv);
        acc = vfma(d, d, acc);
    }
    vf rstd = vset(1.0f / sqrtf(vsum(acc) / (float)n + eps));
    for (int64_t i = 0; i < n; i += LANES) {
        vf v = vmul(vmul(vsub(load_tail(x + i, n - i), mv), rstd), load_any(g, i, n - i, bf16));
        if (b) v = vadd(v, load_any(b, i, n - i, bf16));
        store_tail(y + i, n - i, v);
    }
}

/* q . k[0..d) with k float32 or bfloat16. */
static float dot_any(const float *q, const void *k, int64_t offset, int64_t d, int bf16) {
    vf acc = vzero();
    for (int64_t i = 0; i < d; i += LANES) acc = vfma(load_tail(q + i, d - i), load_any(k, offset + i, d - i, bf16), acc);
    return vsum(acc);
}

/* One head of one query: store its key and value in cache slot `slot` (k and v are this head's
 * (capacity, d) rows, float32 or bfloat16), then softmax over the `count` filled slots (every
 * one visible: a dense layer's slots are tokens 0..count-1, a banded layer's ring holds only
 * its window, in any order) and the weighted sum of values. The new key and value are read
 * back from the cache, so a bfloat16 cache's rounding applies to them as to every other. */
static void attend(const float *q, const float *k_new, const float *v_new, void *k, void *v, float *scores,
                   float *z, int64_t slot, int64_t count, int64_t d, float scale, int bf16) {
    for (int64_t i = 0; i < d; i += LANES) {
        store_any(k, slot * d + i, d - i, load_tail(k_new + i, d - i), bf16);
        store_any(v, slot * d + i, d - i, load_tail(v_new + i, d - i), bf16);
    }
    float top = -INFINITY;
    for (int64_t j = 0; j < count; j++) {
        scores[j] = scale * dot_any(q, k, j * d, d, bf16);
        top = scores[j] > top ? scores[j] : top;
    }
    vf total = vzero();
    for (int64_t j = 0; j < count; j += LANES) {
        vf e = keep_first(count - j, vexp(vsub(load_tail(scores + j, count - j), vset(top))));
        store_tail(scores + j, count - j, e);
        total = vadd(total, e);
    }
    float inverse = 1.0f / vsum(total);
    for (int64_t i = 0; i < d; i += LANES) {
        vf acc = vzero();
        for (int64_t j = 0; j < count; j++)
            acc = vfma(vset(scores[j]), load_any(v, j * d + i, d - i, bf16), acc);
        store_tail(z + i, d - i, vmul(acc, vset(inverse)));
    }
}

/* A block's weights (NULL for a bias it does not have) and shape; minigpt/cpu_decode.py
 * declares the same fields in the same order. bf16: weights, cache, input and output are
 * bfloat16 (else float32). */
typedef struct {
    const void *ln1_w, *ln1_b, *qkv_w, *qkv_b, *attn_proj_w, *attn_proj_b;
    const void *ln2_w, *ln2_b, *fc_w, *fc_b, *mlp_proj_w, *mlp_proj_b;
    int64_t n_embd, n_head, mlp_width, activation, bf16;
    float eps, scale;
} MinigptBlock;

/* out = x + attn(ln_1(x)); out += mlp(ln_2(out)) for one token x (n_embd,). k and v are the
 * layer's cache, (n_head, capacity, head_dim); the token's key and value go to `slot`, and
 * its query sees slots 0..count-1. scratch holds 7 n_embd + mlp_width + n_head * capacity
 * float32s. */
void minigpt_decode_block(const MinigptBlock *p, const void *x, void *out, void *k, void *v, int64_t capacity,
                          int64_t slot, int64_t count, float *scratch, int threads) {
    const int64_t C = p->n_embd, H = p->n_head, D = C / H, F = p->mlp_width;
    const int bf16 = (int)p->bf16;
    float *h = scratch, *qkv = h + C, *z = qkv + 3 * C, *u = z + C, *scores = u + F;
    float *stream = scores + H * capacity, *stream_in = stream + C;  /* the residual stream in float32 */
    const float *xin = bf16 ? stream_in : (const float *)x;
    float *res = bf16 ? stream : (float *)out;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp single
        {
            if (bf16)
                for (int64_t i = 0; i < C; i += LANES) store_tail(stream_in + i, C - i, load_any(x, i, C - i, 1));
            layer_norm(xin, p->ln1_w, p->ln1_b, h, C, p->eps, bf16);
        }
        product_share(p->qkv_w, h, p->qkv_b, NULL, qkv, 3 * C, C, ACT_NONE, bf16);
        #pragma omp barrier
        #pragma omp for schedule(static)
        for (int64_t head = 0; head < H; head++) {
            int64_t rows = head * capacity * D;  /* this head's cache rows, in elements */
            void *kh = bf16 ? (void *)((uint16_t *)k + rows) : (void *)((float *)k + rows);
            void *vh = bf16 ? (void *)((uint16_t *)v + rows) : (void *)((float *)v + rows);
            attend(qkv + head * D, qkv + C + head * D, qkv + 2 * C + head * D, kh, vh, scores + head * capacity,
                   z + head * D, slot, count, D, p->scale, bf16);
        }
        product_share(p->attn_proj_w, z, p->attn_proj_b, xin, res, C, C, ACT_NONE, bf16);
        #pragma omp barrier
        #pragma omp single
        layer_norm(res, p->ln2_w, p->ln2_b, h, C, p->eps, bf16);
        product_share(p->fc_w, h, p->fc_b, NULL, u, F, C, (int)p->activation, bf16);
        #pragma omp barrier
        product_share(p->mlp_proj_w, u, p->mlp_proj_b, res, res, C, F, ACT_NONE, bf16);
        if (bf16) {
            #pragma omp barrier
            #pragma omp single
            for (int64_t i = 0; i < C; i += LANES) store_any(out, i, C - i, load_tail(res + i, C - i), 1);
        }
    }
}
