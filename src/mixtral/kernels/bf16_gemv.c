/* bf16 matrix-vector products for decode-sized batches on x86 CPUs (kernels/cpu_native.py builds it with
   int_dot.c into one library, per instruction set: AVX512F, or AVX2 + FMA).

   y[M, N] (bf16) = x[M, K] (bf16) @ w[N, K]^T (bf16, rows contiguous), fp32 products and sums, one rounding to
   bf16 (to nearest even), as oneDNN's bf16 GEMM computes it (the sums in another order).

   Why: F.linear on a CPU bf16 weight reorders the whole weight into oneDNN's blocked layout on every call, which
   at M = 1 reads and writes it again (measured 1.55-1.7x the time of a prepacked weight, which runs at the
   memory bandwidth). Prepacking the experts would double their memory; this reads each row once as it is.
   Four weight rows per pass share each activation load; a row's sums stay in 16 (8) fp32 lanes until its end.
   Requires K % 32 == 0 (the caller checks; a step takes 32 columns with AVX512, 16 with AVX2). */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define NROWS 4 /* weight rows per pass */

/* A load of 2 * LANES bf16 values as LANES 32-bit words, each word (low half: an even column, high half: the next
   odd one) split into two fp32 vectors with one instruction each: even = word << 16, odd = word & 0xFFFF0000. */
#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vf;
typedef __m512i vi;
static inline vi load_pairs(const uint16_t *p) { return _mm512_loadu_si512((const void *)p); }
static inline vf even_f32(vi v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
static inline vf odd_f32(vi v) { return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000))); }
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
typedef __m256 vf;
typedef __m256i vi;
static inline vi load_pairs(const uint16_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline vf even_f32(vi v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
static inline vf odd_f32(vi v) { return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000))); }
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#else
#error "bf16_gemv.c needs -mavx512f or -mavx2 -mfma"
#endif

static inline uint16_t to_bf16(float f) { /* round to nearest even (finite inputs) */
    union { float f; uint32_t u; } v = {f};
    return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
}

/* Weight rows n0 .. n0 + R - 1 (R a constant after inlining) against every row of x, 2 * LANES columns a step:
   per weight row an even-column and an odd-column accumulator (which also hides the FMA latency). */
static inline __attribute__((always_inline)) void rows_pass(const int R, const uint16_t *x, int64_t M, int64_t K,
                                                            const uint16_t *w, int64_t N, int64_t n0, uint16_t *y) {
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *xm = x + m * K;
        vf acc[NROWS][2];
        for (int j = 0; j < R; j++) acc[j][0] = acc[j][1] = vzero();
        for (int64_t k = 0; k < K; k += 2 * LANES) {
            vi xv = load_pairs(xm + k);
            vf xe = even_f32(xv), xo = odd_f32(xv);
            for (int j = 0; j < R; j++) {
                vi wv = load_pairs(w + (n0 + j) * K + k);
                acc[j][0] = vfma(even_f32(wv), xe, acc[j][0]);
                acc[j][1] = vfma(odd_f32(wv), xo, acc[j][1]);
            }
        }
        for (int j = 0; j < R; j++) y[m * N + n0 + j] = to_bf16(vsum(acc[j][0]) + vsum(acc[j][1]));
    }
}

void bf16_gemv(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, uint16_t *y, int threads) {
    int64_t passes = (N + NROWS - 1) / NROWS;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t p = 0; p < passes; p++) {
        int64_t n0 = p * NROWS;
        if (N - n0 >= NROWS) rows_pass(NROWS, x, M, K, w, N, n0, y);
        else if (N - n0 == 1) rows_pass(1, x, M, K, w, N, n0, y);
        else if (N - n0 == 2) rows_pass(2, x, M, K, w, N, n0, y);
        else rows_pass(3, x, M, K, w, N, n0, y);
    }
}
