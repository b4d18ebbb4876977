// Multiversioning: hot loops are compiled for AVX-512, AVX2+FMA and baseline x86-64, and the loader
// picks the best the CPU supports (GCC on x86-64; elsewhere, and under sanitizers, one plain version).
// The hottest loops (exp of a row) also have hand-written AVX-512 versions, chosen at run time by
// use_avx512() (compiled with target attributes, so the rest of the build stays portable).
#pragma once

#include <atomic>
#include <cstdlib>

#if defined(__GNUC__) && __GNUC__ >= 12 && (defined(__x86_64__) || defined(_M_X64)) && !defined(__clang__) && \
    !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__) && !defined(TILTSMC_NO_MULTIVERSION)
// (Not under ThreadSanitizer either: the loader runs the clones' resolvers before its runtime starts; nor
// with GCC before 12, which has no dispatcher for the x86-64-v3/v4 clones: baseline code there.)
// Compiled for AVX-512, AVX2+FMA and baseline x86-64; the loader picks the best the CPU supports.
#define TILTSMC_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TILTSMC_SIMD_CLONES
#endif

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(TILTSMC_NO_MULTIVERSION)
#define TILTSMC_HAVE_AVX512_PATH 1
#define TILTSMC_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma")))
#include <immintrin.h>
#else
#define TILTSMC_HAVE_AVX512_PATH 0
#endif

namespace tiltsmc {

// -1: decide from the CPU; 0: force the portable code; 1: AVX-512 where the CPU has it (tests use this
// to run both). The environment variable TILTSMC_NO_AVX512=1 forces the portable code at start-up.
inline std::atomic<int> g_avx512_override{-1};

inline bool cpu_has_avx512() {
#if TILTSMC_HAVE_AVX512_PATH
    static const bool supported = [] {
        const char* off = std::getenv("TILTSMC_NO_AVX512");
        if (off && off[0] != '\0' && off[0] != '0') return false;
        __builtin_cpu_init();  // also checks that the OS saves the AVX-512 registers
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("fma");
    }();
    return supported;
#else
    return false;
#endif
}

inline bool use_avx512() {
    const int choice = g_avx512_override.load(std::memory_order_relaxed);
    return choice != 0 && cpu_has_avx512();
}

}  // namespace tiltsmc
