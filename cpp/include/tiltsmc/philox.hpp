// The CPU's readers of the Philox4x32-10 streams (the generator itself is in philox_block.hpp, shared
// with the CUDA kernels): sixteen draws at once in vector lanes, and a sequential stream reader.
#pragma once

#include <cstdint>

#include "tiltsmc/philox_block.hpp"
#include "tiltsmc/simd.hpp"

namespace tiltsmc {

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
