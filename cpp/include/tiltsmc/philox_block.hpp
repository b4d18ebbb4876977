// Philox4x32-10 counter-based random numbers (Salmon et al., SC'11): a bijection of a 128-bit counter
// keyed by 64 bits. A stream is (key, row); draw j of that stream is output j % 2 of block j / 2, the
// block of counter (j / 2, row). Shared by the CPU core and the CUDA kernels (no SIMD, no STL), so the
// two cannot drift apart.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TILTSMC_HOST_DEVICE __host__ __device__
#else
#define TILTSMC_HOST_DEVICE
#endif

namespace tiltsmc {

struct Philox4x32 {
    std::uint32_t key0;
    std::uint32_t key1;

    TILTSMC_HOST_DEVICE explicit Philox4x32(std::uint64_t key)
        : key0(static_cast<std::uint32_t>(key)), key1(static_cast<std::uint32_t>(key >> 32)) {}

    // Ten rounds on counter (c0, c1, c2, c3); writes four 32-bit outputs.
    TILTSMC_HOST_DEVICE inline void block(std::uint32_t c0, std::uint32_t c1, std::uint32_t c2, std::uint32_t c3,
                                          std::uint32_t out[4]) const {
        std::uint32_t k0 = key0, k1 = key1;
        for (int round = 0; round < 10; ++round) {
            const std::uint64_t p0 = static_cast<std::uint64_t>(0xD2511F53u) * c0;
            const std::uint64_t p1 = static_cast<std::uint64_t>(0xCD9E8D57u) * c2;
            const std::uint32_t hi0 = static_cast<std::uint32_t>(p0 >> 32), lo0 = static_cast<std::uint32_t>(p0);
            const std::uint32_t hi1 = static_cast<std::uint32_t>(p1 >> 32), lo1 = static_cast<std::uint32_t>(p1);
            c0 = hi1 ^ c1 ^ k0;
            c1 = lo1;
            c2 = hi0 ^ c3 ^ k1;
            c3 = lo0;
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        out[0] = c0;
        out[1] = c1;
        out[2] = c2;
        out[3] = c3;
    }
};

// Two uniform doubles in [0, 1) with 53 random bits each from one Philox block: draws 2 pair and
// 2 pair + 1 of the stream (key, row).
TILTSMC_HOST_DEVICE inline void philox_uniform2(const Philox4x32& gen, std::uint64_t row, std::uint64_t pair,
                                                double out[2]) {
    std::uint32_t bits[4];
    gen.block(static_cast<std::uint32_t>(pair), static_cast<std::uint32_t>(pair >> 32),
              static_cast<std::uint32_t>(row), static_cast<std::uint32_t>(row >> 32), bits);
    constexpr double scale = 1.0 / 9007199254740992.0;  // 2^-53
    out[0] = static_cast<double>((static_cast<std::uint64_t>(bits[0] >> 5) << 26) | (bits[1] >> 6)) * scale;
    out[1] = static_cast<double>((static_cast<std::uint64_t>(bits[2] >> 5) << 26) | (bits[3] >> 6)) * scale;
}

// Draw j of the stream (key, row) on its own (random access, as the GPU kernels read it).
TILTSMC_HOST_DEVICE inline double philox_uniform_at(const Philox4x32& gen, std::uint64_t row, std::uint64_t j) {
    double pair[2];
    philox_uniform2(gen, row, j >> 1, pair);
    return pair[j & 1];
}

}  // namespace tiltsmc
