/* Peak float32 multiply-add rate of this x86 machine: THREADS threads, each running independent
 * chains of vector fused multiply-adds (AVX-512 where the compiler targets it, else AVX2 + FMA)
 * with no memory traffic. Prints GFLOP/s (2 FLOP per multiply-add per lane), summed over threads.
 *
 *   cc -O3 -march=native -pthread fma_peak.c -o fma_peak && ./fma_peak THREADS
 *
 * CHAINS independent accumulators cover the FMA latency times the FMA units of one core (4 cycles
 * x 2 units = 8 on the x86 cores of today); 10 chains and two constants fit in the 16 registers of
 * AVX2. No float32 product on the machine can run faster than this figure. */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define CHAINS 10
#define STEPS 100000000L

#if defined(__AVX512F__)
typedef __m512 vec;
#define LANES 16
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define FIRST(v) _mm512_cvtss_f32(v)
#elif defined(__FMA__)
typedef __m256 vec;
#define LANES 8
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define FIRST(v) _mm256_cvtss_f32(v)
#else
#error "fma_peak needs an x86 compiler target with FMA (AVX2) or AVX-512"
#endif

static volatile float sink;

static void *run_chains(void *unused) {
    (void)unused;
    vec acc[CHAINS];
    const vec scale = SET1(0.999999f), shift = SET1(1e-6f);
    for (int c = 0; c < CHAINS; c++) acc[c] = SET1((float)c);
    for (long s = 0; s < STEPS; s++)
        for (int c = 0; c < CHAINS; c++) acc[c] = FMA(acc[c], scale, shift);
    float total = 0;
    for (int c = 0; c < CHAINS; c++) total += FIRST(acc[c]);
    sink = total;
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    if (threads < 1 || threads > 1024) {
        fprintf(stderr, "usage: fma_peak THREADS (1 to 1024)\n");
        return 2;
    }
    pthread_t *workers = malloc(sizeof(pthread_t) * (size_t)threads);
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int t = 0; t < threads; t++) pthread_create(&workers[t], NULL, run_chains, NULL);
    for (int t = 0; t < threads; t++) pthread_join(workers[t], NULL);
    clock_gettime(CLOCK_MONOTONIC, &end);
    double seconds = (double)(end.tv_sec - start.tv_sec) + 1e-9 * (double)(end.tv_nsec - start.tv_nsec);
    double flops = 2.0 * LANES * CHAINS * (double)STEPS * threads;
    printf("%.3f %d\n", flops / seconds / 1e9, LANES);
    free(workers);
    return 0;
}
