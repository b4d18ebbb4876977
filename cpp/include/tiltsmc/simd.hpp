// Multiversioning: hot loops are compiled for AVX-512, AVX2+FMA and baseline x86-64, and the loader
// picks the best the CPU supports (GCC on x86-64; elsewhere, and under sanitizers, one plain version).
#pragma once

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64)) && !defined(__clang__) && \
    !defined(__SANITIZE_ADDRESS__) && !defined(TILTSMC_NO_MULTIVERSION)
// Compiled for AVX-512, AVX2+FMA and baseline x86-64; the loader picks the best the CPU supports.
#define TILTSMC_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TILTSMC_SIMD_CLONES
#endif
