/* One core's multiply-accumulate peak for the instructions ptq's kernels are built on.
 * Built and run by tools/bench_peers.py (cc -O2 -march=native tools/peak.c); prints
 * `name GMAC/s` lines. Each loop keeps 12 independent accumulator chains so that only
 * throughput, not latency, limits it. A MAC is one u8*i8 (or f32*f32) product added. */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

#define ITERS 20000000L
#define BEST_OF 5

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
static double vnni512(void) {
    __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(2);
    __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0,
            c6 = c0, c7 = c0, c8 = c0, c9 = c0, c10 = c0, c11 = c0;
    double t = now();
    for (long i = 0; i < ITERS; i++) {
        __asm__ volatile("" : "+v"(a), "+v"(b));
        c0 = _mm512_dpbusd_epi32(c0, a, b); c1 = _mm512_dpbusd_epi32(c1, a, b);
        c2 = _mm512_dpbusd_epi32(c2, a, b); c3 = _mm512_dpbusd_epi32(c3, a, b);
        c4 = _mm512_dpbusd_epi32(c4, a, b); c5 = _mm512_dpbusd_epi32(c5, a, b);
        c6 = _mm512_dpbusd_epi32(c6, a, b); c7 = _mm512_dpbusd_epi32(c7, a, b);
        c8 = _mm512_dpbusd_epi32(c8, a, b); c9 = _mm512_dpbusd_epi32(c9, a, b);
        c10 = _mm512_dpbusd_epi32(c10, a, b); c11 = _mm512_dpbusd_epi32(c11, a, b);
    }
    t = now() - t;
    __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3)),
                _mm512_add_epi32(_mm512_add_epi32(c4, c5), _mm512_add_epi32(c6, c7)));
    s = _mm512_add_epi32(s, _mm512_add_epi32(_mm512_add_epi32(c8, c9), _mm512_add_epi32(c10, c11)));
    volatile int sink = _mm512_reduce_add_epi32(s); (void)sink;
    return 12.0 * 64.0 * ITERS / t / 1e9;
}
#endif

#if defined(__AVX2__)
/* The AVX2 int8 sequence: vpmaddubsw (32 u8*i8 products into i16 pairs), then vpmaddwd by
 * ones and vpaddd; counted as 32 MACs per vpmaddubsw. Eight chains on eight distinct
 * (a, b) pairs, all passed through an empty asm each iteration: with one pair the compiler
 * computes the product once per iteration and the loop times mostly vpaddd (it did: 1
 * vpmaddubsw for 12 chains, about twice the real rate). */
static double avx2_maddubs(void) {
    __m256i a0 = _mm256_set1_epi8(1), a1 = _mm256_set1_epi8(3), a2 = _mm256_set1_epi8(5),
            a3 = _mm256_set1_epi8(7), b0 = _mm256_set1_epi8(2), b1 = _mm256_set1_epi8(4),
            one = _mm256_set1_epi16(1);
    __m256i c[8];
    for (int j = 0; j < 8; j++) c[j] = _mm256_setzero_si256();
    double t = now();
    for (long i = 0; i < ITERS; i++) {
        __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(b0), "+x"(b1));
        __m256i a[4] = {a0, a1, a2, a3};
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            c[2 * r] = _mm256_add_epi32(c[2 * r], _mm256_madd_epi16(_mm256_maddubs_epi16(a[r], b0), one));
            c[2 * r + 1] =
                _mm256_add_epi32(c[2 * r + 1], _mm256_madd_epi16(_mm256_maddubs_epi16(a[r], b1), one));
        }
    }
    t = now() - t;
    __m256i s = c[0];
    for (int j = 1; j < 8; j++) s = _mm256_add_epi32(s, c[j]);
    volatile int sink = _mm256_extract_epi32(s, 0); (void)sink;
    return 8.0 * 32.0 * ITERS / t / 1e9;
}
#endif

#if defined(__AVX512F__)
static double fma512(void) {
    __m512 a = _mm512_set1_ps(1.0001f), b = _mm512_set1_ps(0.9999f);
    __m512 c[12];
    for (int j = 0; j < 12; j++) c[j] = _mm512_setzero_ps();
    double t = now();
    for (long i = 0; i < ITERS; i++) {
        __asm__ volatile("" : "+v"(a), "+v"(b));
#pragma GCC unroll 12
        for (int j = 0; j < 12; j++) c[j] = _mm512_fmadd_ps(a, b, c[j]);
    }
    t = now() - t;
    __m512 s = c[0];
    for (int j = 1; j < 12; j++) s = _mm512_add_ps(s, c[j]);
    volatile float sink = _mm512_reduce_add_ps(s); (void)sink;
    return 12.0 * 16.0 * ITERS / t / 1e9;
}
#endif

#if defined(__FMA__)
static double fma256(void) {
    __m256 a = _mm256_set1_ps(1.0001f), b = _mm256_set1_ps(0.9999f);
    __m256 c[12];
    for (int j = 0; j < 12; j++) c[j] = _mm256_setzero_ps();
    double t = now();
    for (long i = 0; i < ITERS; i++) {
        __asm__ volatile("" : "+x"(a), "+x"(b));
#pragma GCC unroll 12
        for (int j = 0; j < 12; j++) c[j] = _mm256_fmadd_ps(a, b, c[j]);
    }
    t = now() - t;
    __m256 s = c[0];
    for (int j = 1; j < 12; j++) s = _mm256_add_ps(s, c[j]);
    float out[8];
    _mm256_storeu_ps(out, s);
    volatile float sink = out[0]; (void)sink;
    return 12.0 * 8.0 * ITERS / t / 1e9;
}
#endif

static double best(double (*f)(void)) {
    double b = 0;
    for (int i = 0; i < BEST_OF; i++) {
        double g = f();
        if (g > b) b = g;
    }
    return b;
}

int main(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    printf("vpdpbusd_zmm %.1f\n", best(vnni512));
#endif
#if defined(__AVX2__)
    printf("vpmaddubsw_ymm %.1f\n", best(avx2_maddubs));
#endif
#if defined(__AVX512F__)
    printf("vfmadd_f32_zmm %.1f\n", best(fma512));
#endif
#if defined(__FMA__)
    printf("vfmadd_f32_ymm %.1f\n", best(fma256));
#endif
    return 0;
}
