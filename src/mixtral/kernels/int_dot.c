/* Integer-dot matmul for int4 / int8 weights on x86 CPUs (kernels/cpu_native.py builds and loads it), compiled
   once per instruction set: AVX512-VNNI (-mavx512vnni ...), AVX-VNNI (-mavx2 -mfma -mavxvnni: 256-bit vpdpbusd)
   or AVX2 (-mavx2 -mfma), the same layout and results.

   y[M, N] (bf16) = x[M, K] (bf16) @ W^T, W[n, k] = (u[n, k] - off) * S[g, n] + Z[g, n], g = k / group,
   u the unsigned code (int4: 0..15, off 8; int8: 0..255, off 128), S and Z bf16 (Z may be absent: 0).

   Why integer dots: on this class of CPU a dequantize-then-FMA kernel (PyTorch's _weight_int4pack_mm_for_cpu)
   is bound by the dequantization, not by memory, at batch 1. Each input row is instead rounded to int8 in blocks
   of 32 (one fp32 scale d per block, as llama.cpp does with its Q8 activations) and the codes are multiplied as
   integers: one vpdpbusd takes 64 u8 x s8 products (AVX2: vpmaddubsw + vpmaddwd, 32 products in two steps).
   Per unit v of UNIT columns (32, or 16 for groups of 16: GGUF's Q6_K, Q3_K, Q2_K), inside one activation block,
   exactly in int32:
       sum_k (u - off) a = dot_v - off * asum_v
   so y = sum_g S_g sum_{v in g} d_b(v) (dot_v - off asum_v) + Z_g sum_{v in g} d_b(v) asum_v.
   The only rounding beyond the fp32 accumulation is the int8 activation (~0.5% of a row's norm).

   Weight layout, one tile of 16 output channels after another, each tile's columns in order:
     int4: per 8 columns k0..k0+7, 64 bytes; byte 4c + i holds channel c's code of column k0 + i in its low
           nibble and of column k0 + 4 + i in its high nibble (c < 16, i < 4);
     int8: per 4 columns k0..k0+3, 64 bytes; byte 4c + i is channel c's code of column k0 + i.
   so one 64-byte load feeds vpdpbusd lanes c = 0..15 with 4 consecutive columns each against 4 broadcast
   activation bytes. S and Z: [N / 16][K / group][16] (one tile's groups contiguous).
   Requires K % 32 == 0, group % 16 == 0, K % group == 0, N % 16 == 0 (the caller checks). */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    int64_t K, N, blocks, groups, units_per_group; /* blocks: of 32 columns (one activation scale each) */
    int bits, off;        /* off: what the integer dot carries beyond sum (u - off) a, per unit of asum */
    const int8_t *a;      /* [M, K] */
    const float *d;       /* [M, blocks] */
    const int32_t *asum;  /* [M, K / 16]: code sums of each 16 columns */
    const float *zsum;    /* [M, groups]: the group's sum of d * asum (the Z term's input sum) */
} Acts;

/* Row m's code sum over the UNIT columns from col, and (*d) the scale of their activation block. */
static inline int32_t unit_sums(const Acts *A, int64_t m, int64_t col, const int UNIT, float *d) {
    const int32_t *s = A->asum + m * (A->K / 16) + col / 16;
    *d = A->d[m * A->blocks + col / 32];
    return UNIT == 32 ? s[0] + s[1] : s[0];
}

#if defined(__AVX512VNNI__)
#define ROWS 4 /* activation rows per pass over a tile: 4 int32 + 4 fp32 + 4 fp32 accumulators stay in registers */
#define INT8_OFF 128 /* vpdpbusd multiplies the unsigned code u, so its dot carries 128 * asum for int8 */

static inline __m512 bf16x16_to_f32(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m256i f32x16_to_bf16(__m512 v) { /* round to nearest even (inputs are finite) */
    __m512i b = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

/* One row of x -> int8 codes a [K], block scales d [K / 32] and code sums asum [K / 16] (each half block). */
static void quantize_row(const uint16_t *x, int64_t K, int8_t *a, float *d, int32_t *asum) {
    for (int64_t b = 0; b < K / 32; b++) {
        __m512 v0 = bf16x16_to_f32(x + 32 * b), v1 = bf16x16_to_f32(x + 32 * b + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float scale = amax / 127.0f;
        __m512 inv = _mm512_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)); /* round to nearest even, |q| <= 127 */
        __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
        _mm_storeu_si128((__m128i *)(a + 32 * b), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(a + 32 * b + 16), _mm512_cvtsepi32_epi8(q1));
        d[b] = scale;
        asum[2 * b] = _mm512_reduce_add_epi32(q0);
        asum[2 * b + 1] = _mm512_reduce_add_epi32(q1);
    }
}


/* R (1..ROWS) rows m0.. of y for tile t, in units of UNIT (32 or 16) columns; both constants after inlining. */
static inline __attribute__((always_inline)) void tile_rows(const int R, const int UNIT, const Acts *A, int64_t m0,
                                                            int64_t t,
                                                            const uint8_t *w, const uint16_t *S, const uint16_t *Z,
                                                            uint16_t *y) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const uint8_t *wp = w + t * A->K * 16 * A->bits / 8;
    const uint16_t *St = S + t * A->groups * 16, *Zt = Z ? Z + t * A->groups * 16 : NULL;
    __m512 out[ROWS];
    for (int r = 0; r < R; r++) out[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < A->groups; g++) {
        __m512 gacc[ROWS];
        for (int r = 0; r < R; r++) gacc[r] = _mm512_setzero_ps();
        for (int64_t uu = 0; uu < A->units_per_group; uu++) {
            int64_t col = (g * A->units_per_group + uu) * UNIT; /* the unit's first column */
            __m512i acc[ROWS];
            for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_si512();
            if (A->bits == 4) {
                for (int c = 0; c < UNIT / 8; c++, wp += 64) { /* 8 columns a load */
                    __m512i v = _mm512_loadu_si512((const void *)wp);
                    __m512i lo = _mm512_and_si512(v, low4);
                    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                    for (int r = 0; r < R; r++) {
                        const int32_t *ar = (const int32_t *)(A->a + (m0 + r) * A->K + col + 8 * c);
                        acc[r] = _mm512_dpbusd_epi32(acc[r], lo, _mm512_set1_epi32(ar[0]));
                        acc[r] = _mm512_dpbusd_epi32(acc[r], hi, _mm512_set1_epi32(ar[1]));
                    }
                }
            } else {
                for (int c = 0; c < UNIT / 4; c++, wp += 64) { /* 4 columns a load */
                    __m512i v = _mm512_loadu_si512((const void *)wp);
                    for (int r = 0; r < R; r++) {
                        const int32_t *ar = (const int32_t *)(A->a + (m0 + r) * A->K + col + 4 * c);
                        acc[r] = _mm512_dpbusd_epi32(acc[r], v, _mm512_set1_epi32(ar[0]));
                    }
                }
            }
            for (int r = 0; r < R; r++) {
                float dv;
                int32_t asum = unit_sums(A, m0 + r, col, UNIT, &dv);
                __m512i exact = _mm512_sub_epi32(acc[r], _mm512_set1_epi32(A->off * asum));
                gacc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), _mm512_set1_ps(dv), gacc[r]);
            }
        }
        __m512 s = bf16x16_to_f32(St + 16 * g);
        for (int r = 0; r < R; r++) out[r] = _mm512_fmadd_ps(gacc[r], s, out[r]);
        if (Zt) {
            __m512 z = bf16x16_to_f32(Zt + 16 * g);
            for (int r = 0; r < R; r++)
                out[r] = _mm512_fmadd_ps(z, _mm512_set1_ps(A->zsum[(m0 + r) * A->groups + g]), out[r]);
        }
    }
    for (int r = 0; r < R; r++)
        _mm256_storeu_si256((__m256i *)(y + (m0 + r) * A->N + 16 * t), f32x16_to_bf16(out[r]));
}

#elif defined(__AVX2__) && defined(__FMA__)
#define ROWS 2 /* AVX2 has 16 vector registers: two rows' 2 x (int32, group, output) accumulators */
#if defined(__AVXVNNI__) /* 256-bit vpdpbusd (-mavxvnni: Alder Lake and later, Zen 5): as the AVX512 build */
#define INT8_OFF 128
#else
#define INT8_OFF 0 /* int8 codes are multiplied signed (vpsignb moves the sign to a), so the dot is sum c a */
#endif

static inline __m256 bf16x8_to_f32(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline __m128i f32x8_to_bf16(__m256 v) { /* round to nearest even (inputs are finite) */
    __m256i b = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8); /* packus works per 128-bit lane */
    return _mm256_castsi256_si128(packed);
}

static void quantize_row(const uint16_t *x, int64_t K, int8_t *a, float *d, int32_t *asum) {
    const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int64_t b = 0; b < K / 32; b++) {
        __m256 v[4], m = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = bf16x8_to_f32(x + 32 * b + 8 * i);
            m = _mm256_max_ps(m, _mm256_and_ps(v[i], nosign));
        }
        float lanes[8], amax = 0.0f;
        _mm256_storeu_ps(lanes, m);
        for (int j = 0; j < 8; j++) amax = lanes[j] > amax ? lanes[j] : amax;
        float scale = amax / 127.0f;
        __m256 inv = _mm256_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
        int32_t q[32], sum[2] = {0, 0};
        for (int i = 0; i < 4; i++) /* round to nearest even, as the AVX512 build */
            _mm256_storeu_si256((__m256i *)(q + 8 * i), _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)));
        for (int j = 0; j < 32; j++) {
            a[32 * b + j] = (int8_t)q[j];
            sum[j / 16] += q[j];
        }
        d[b] = scale;
        asum[2 * b] = sum[0];
        asum[2 * b + 1] = sum[1];
    }
}

/* 32 bytes of int4 codes -> their low nibbles (columns k0..k0+3 of each channel) and high ones (k0+4..k0+7). */
static inline void split_nibbles(const uint8_t *p, __m256i *lo, __m256i *hi) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    *lo = _mm256_and_si256(v, low4);
    *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
}

#if defined(__AVXVNNI__)
/* acc (int32 per channel) += the 8 columns' products: low nibbles with a0's 4 bytes, high ones with a1's. */
static inline __m256i int4_dot(__m256i acc, __m256i lo, __m256i hi, int32_t a0, int32_t a1) {
    acc = _mm256_dpbusd_avx_epi32(acc, lo, _mm256_set1_epi32(a0));
    return _mm256_dpbusd_avx_epi32(acc, hi, _mm256_set1_epi32(a1));
}

/* acc (int32 per channel) += 4 columns' unsigned codes v times a's 4 bytes. */
static inline __m256i int8_dot(__m256i acc, __m256i v, int32_t a) {
    return _mm256_dpbusd_avx_epi32(acc, v, _mm256_set1_epi32(a));
}
#else
/* acc holds int16 pair sums here (vpmaddwd turns them into int32 after the unit): a unit of at most 32 columns
   adds 16 products of |u| <= 15 and |a| <= 127 to a lane, <= 30480, so nothing saturates. */
static inline __m256i int4_dot(__m256i acc, __m256i lo, __m256i hi, int32_t a0, int32_t a1) {
    __m256i both = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(a0)),
                                    _mm256_maddubs_epi16(hi, _mm256_set1_epi32(a1)));
    return _mm256_add_epi16(acc, both);
}

/* int8 codes multiplied signed: |c| * (a * sign c), pairs <= 2 * 128 * 127 = 32512, no saturation. */
static inline __m256i int8_dot(__m256i acc, __m256i v, int32_t a) {
    __m256i code = _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80)); /* c = u - 128 */
    __m256i mag = _mm256_sign_epi8(code, code);                           /* |c| as u8 (-128 reads 128) */
    __m256i prod = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(_mm256_set1_epi32(a), code));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(prod, _mm256_set1_epi16(1)));
}
#endif

/* As the AVX512 tile_rows, each 64-byte run as two halves: channels 0-7 (bytes 0-31) and 8-15 (bytes 32-63). */
static inline __attribute__((always_inline)) void tile_rows(const int R, const int UNIT, const Acts *A, int64_t m0,
                                                            int64_t t,
                                                            const uint8_t *w, const uint16_t *S, const uint16_t *Z,
                                                            uint16_t *y) {
    const uint8_t *wp = w + t * A->K * 16 * A->bits / 8;
    const uint16_t *St = S + t * A->groups * 16, *Zt = Z ? Z + t * A->groups * 16 : NULL;
    __m256 out[ROWS][2];
    for (int r = 0; r < R; r++) out[r][0] = out[r][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < A->groups; g++) {
        __m256 gacc[ROWS][2];
        for (int r = 0; r < R; r++) gacc[r][0] = gacc[r][1] = _mm256_setzero_ps();
        for (int64_t uu = 0; uu < A->units_per_group; uu++) {
            int64_t col = (g * A->units_per_group + uu) * UNIT; /* the unit's first column */
            __m256i acc[ROWS][2];
            for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
            if (A->bits == 4) {
                for (int c = 0; c < UNIT / 8; c++, wp += 64) {
                    for (int h = 0; h < 2; h++) {
                        __m256i lo, hi;
                        split_nibbles(wp + 32 * h, &lo, &hi);
                        for (int r = 0; r < R; r++) {
                            const int32_t *ar = (const int32_t *)(A->a + (m0 + r) * A->K + col + 8 * c);
                            acc[r][h] = int4_dot(acc[r][h], lo, hi, ar[0], ar[1]);
                        }
                    }
                }
#if !defined(__AVXVNNI__)
                for (int r = 0; r < R; r++)
                    for (int h = 0; h < 2; h++) acc[r][h] = _mm256_madd_epi16(acc[r][h], _mm256_set1_epi16(1));
#endif
            } else {
                for (int c = 0; c < UNIT / 4; c++, wp += 64) {
                    for (int h = 0; h < 2; h++) {
                        __m256i v = _mm256_loadu_si256((const __m256i *)(wp + 32 * h));
                        for (int r = 0; r < R; r++) {
                            const int32_t *ar = (const int32_t *)(A->a + (m0 + r) * A->K + col + 4 * c);
                            acc[r][h] = int8_dot(acc[r][h], v, ar[0]);
                        }
                    }
                }
            }
            for (int r = 0; r < R; r++) {
                float dv;
                __m256i off = _mm256_set1_epi32(A->off * unit_sums(A, m0 + r, col, UNIT, &dv));
                for (int h = 0; h < 2; h++) {
                    __m256 exact = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][h], off));
                    gacc[r][h] = _mm256_fmadd_ps(exact, _mm256_set1_ps(dv), gacc[r][h]);
                }
            }
        }
        for (int h = 0; h < 2; h++) {
            __m256 s = bf16x8_to_f32(St + 16 * g + 8 * h);
            for (int r = 0; r < R; r++) out[r][h] = _mm256_fmadd_ps(gacc[r][h], s, out[r][h]);
            if (Zt) {
                __m256 z = bf16x8_to_f32(Zt + 16 * g + 8 * h);
                for (int r = 0; r < R; r++)
                    out[r][h] = _mm256_fmadd_ps(z, _mm256_set1_ps(A->zsum[(m0 + r) * A->groups + g]), out[r][h]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int h = 0; h < 2; h++)
            _mm_storeu_si128((__m128i *)(y + (m0 + r) * A->N + 16 * t + 8 * h), f32x8_to_bf16(out[r][h]));
}

#else
#error "int_dot.c needs -mavx512f -mavx512bw -mavx512vl -mavx512vnni or -mavx2 -mfma"
#endif

/* tile_rows with R = rows, a specialised copy for each (R, UNIT). */
static inline __attribute__((always_inline)) void rows_of_unit(int rows, const int UNIT, const Acts *A, int64_t m0,
                                                               int64_t t, const uint8_t *w, const uint16_t *S,
                                                               const uint16_t *Z, uint16_t *y) {
    if (rows == ROWS) tile_rows(ROWS, UNIT, A, m0, t, w, S, Z, y);
    else if (rows == 1) tile_rows(1, UNIT, A, m0, t, w, S, Z, y);
#if ROWS > 3
    else if (rows == 2) tile_rows(2, UNIT, A, m0, t, w, S, Z, y);
    else tile_rows(3, UNIT, A, m0, t, w, S, Z, y);
#endif
}

/* Returns 0, or -1 when a temporary could not be allocated (y untouched). */
int int_dot_matmul(const uint16_t *x, int64_t M, int64_t K, int64_t N, const uint8_t *w, int bits, int64_t group,
                   const uint16_t *S, const uint16_t *Z, uint16_t *y, int threads) {
    const int unit = group % 32 == 0 ? 32 : 16;
    Acts A = {K, N, K / 32, K / group, group / unit, bits, bits == 4 ? 8 : INT8_OFF, NULL, NULL, NULL, NULL};
    int8_t *a = malloc((size_t)(M * K));
    float *d = malloc(sizeof(float) * (size_t)(M * A.blocks));
    int32_t *asum = malloc(sizeof(int32_t) * (size_t)(M * (K / 16)));
    float *zsum = malloc(sizeof(float) * (size_t)(M * A.groups));
    if (!a || !d || !asum || !zsum) {
        free(a); free(d); free(asum); free(zsum);
        return -1;
    }
    for (int64_t m = 0; m < M; m++) {
        quantize_row(x + m * K, K, a + m * K, d + m * A.blocks, asum + m * (K / 16));
        for (int64_t g = 0; g < A.groups; g++) {
            float s = 0.0f;
            for (int64_t v = g * group / 16; v < (g + 1) * group / 16; v++) /* 16-column halves of the group */
                s += d[m * A.blocks + v / 2] * (float)asum[m * (K / 16) + v];
            zsum[m * A.groups + g] = s;
        }
    }
    A.a = a; A.d = d; A.asum = asum; A.zsum = zsum;
    int64_t tiles = N / 16;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t t = 0; t < tiles; t++) {
        for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
            int rows = M - m0 < ROWS ? (int)(M - m0) : ROWS;
            if (unit == 32) rows_of_unit(rows, 32, &A, m0, t, w, S, Z, y);
            else rows_of_unit(rows, 16, &A, m0, t, w, S, Z, y);
        }
    }
    free(a); free(d); free(asum); free(zsum);
    return 0;
}
