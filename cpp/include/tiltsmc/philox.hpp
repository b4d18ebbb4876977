// Philox4x32-10 counter-based random numbers (Salmon et al., SC'11): a bijection of a 128-bit counter
// keyed by 64 bits. A stream is (key, row); draw j of that stream reads block j/2 of counter (j/2, row).
#pragma once

#include <cstdint>

#include "tiltsmc/simd.hpp"

namespace tiltsmc {

struct Philox4x32 {
    std::uint32_t key0;
    std::uint32_t key1;

    explicit Philox4x32(std::uint64_t key)
        : key0(static_cast<std::uint32_t>(key)), key1(static_cast<std::uint32_t>(key >> 32)) {}

    // Ten rounds on counter (c0, c1, c2, c3); writes four 32-bit outputs.
    inline void block(std::uint32_t c0, std::uint32_t c1, std::uint32_t c2, std::uint32_t c3,
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

// Two uniform doubles in [0, 1) with 53 random bits each from one Philox block.
inline void philox_uniform2(const Philox4x32& gen, std::uint64_t row, std::uint64_t pair, double out[2]) {
    std::uint32_t bits[4];
    gen.block(static_cast<std::uint32_t>(pair), static_cast<std::uint32_t>(pair >> 32),
              static_cast<std::uint32_t>(row), static_cast<std::uint32_t>(row >> 32), bits);
    constexpr double scale = 1.0 / 9007199254740992.0;  // 2^-53
    out[0] = static_cast<double>((static_cast<std::uint64_t>(bits[0] >> 5) << 26) | (bits[1] >> 6)) * scale;
    out[1] = static_cast<double>((static_cast<std::uint64_t>(bits[2] >> 5) << 26) | (bits[3] >> 6)) * scale;
}

// Uniforms 2 * first_pair ... 2 * first_pair + 15 of the stream (key, row): eight Philox blocks at once
// in 64-bit vector lanes (GCC/Clang vector extensions), the same numbers as philox_uniform2.
TILTSMC_SIMD_CLONES inline void philox_uniform16(const Philox4x32& gen, std::uint64_t row, std::uint64_t first_pair,
                             double out[16]) {
    typedef std::uint64_t Lanes __attribute__((vector_size(64)));
    typedef double Doubles __attribute__((vector_size(64)));
    const Lanes low32 = Lanes{} + 0xFFFFFFFFu;
    const Lanes pair = Lanes{0, 1, 2, 3, 4, 5, 6, 7} + first_pair;
    Lanes c0 = pair & low32, c1 = pair >> 32;
    Lanes c2 = Lanes{} + (row & 0xFFFFFFFFu), c3 = Lanes{} + (row >> 32);
    std::uint32_t k0 = gen.key0, k1 = gen.key1;
    for (int round = 0; round < 10; ++round) {
        const Lanes p0 = c0 * 0xD2511F53u, p1 = c2 * 0xCD9E8D57u;
        const Lanes next0 = ((p1 >> 32) ^ c1 ^ k0) & low32;
        const Lanes next2 = ((p0 >> 32) ^ c3 ^ k1) & low32;
        c1 = p1 & low32;
        c3 = p0 & low32;
        c0 = next0;
        c2 = next2;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    constexpr double scale = 1.0 / 9007199254740992.0;  // 2^-53
    const Doubles first = __builtin_convertvector(((c0 >> 5) << 26) | (c1 >> 6), Doubles) * scale;
    const Doubles second = __builtin_convertvector(((c2 >> 5) << 26) | (c3 >> 6), Doubles) * scale;
    for (int k = 0; k < 8; ++k) {
        out[2 * k] = first[k];
        out[2 * k + 1] = second[k];
    }
}

// Uniform draws of one row's stream, read sequentially (draw 0, 1, 2, ...).
class UniformStream {
public:
    UniformStream(std::uint64_t key, std::uint64_t row) : gen_(key), row_(row) {}

    double next() {
        if (buffered_ == 0) {
            philox_uniform2(gen_, row_, pair_++, buffer_);
            buffered_ = 2;
        }
        return buffer_[2 - buffered_--];
    }

    // Uniform in (0, 1]: for logarithms.
    double next_open_zero() { return 1.0 - next(); }

    // The next `count` draws into out (as many next() calls would give), sixteen at a time.
    void fill(double* out, std::int64_t count) {
        std::int64_t j = 0;
        for (; j < count && buffered_ > 0; ++j) out[j] = next();
        for (; j + 16 <= count; j += 16, pair_ += 8) philox_uniform16(gen_, row_, pair_, out + j);
        for (; j < count; ++j) out[j] = next();
    }

private:
    Philox4x32 gen_;
    std::uint64_t row_;
    std::uint64_t pair_ = 0;
    double buffer_[2] = {0.0, 0.0};
    int buffered_ = 0;
};

}  // namespace tiltsmc
