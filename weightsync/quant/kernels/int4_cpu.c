/* Fused int4 quantize + pack for bf16 / fp32 rows on the CPU: one pass, rows in cache.
 *
 * Same grid, op for op, as weightsync/quant/int4.py (the reference): fp32 group statistics,
 * scale rounded to the storage dtype (bf16: round-to-nearest-even on the bits) before codes
 * are computed, codes = rint(x / scale) under the default rounding mode (half to even).
 * Group min/max are taken on the float BITS mapped to an order-preserving integer key, so
 * the reductions vectorise without -ffast-math (which would also license x * (1/s) and
 * change bits). Build flags: -O3 -fno-math-errno -ffp-contract=off, never -ffast-math.
 *
 * Returns 0, or 1 if a group holds NaN/Inf (outputs are then garbage and must be dropped).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* Order-preserving key of a float's bits: negative floats reversed below positive ones. */
static inline uint32_t key32(uint32_t u) { return (u & 0x80000000u) ? ~u : (u | 0x80000000u); }
static inline uint32_t unkey32(uint32_t k) { return (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k; }

static inline float round_scale(float s, int bf16, uint16_t *bits_out) {
    if (!bf16) return s;
    uint32_t b = f32_to_bits(s);
    b = (b + ((b >> 16) & 1u) + 0x7fffu) >> 16;
    *bits_out = (uint16_t)b;
    return bits_to_f32(b << 16);
}

static inline float group_scale(float lo, float hi, int asym, int bf16, uint16_t *sbits) {
    float s;
    if (asym) {
        lo = lo < 0.0f ? lo : 0.0f;
        hi = hi > 0.0f ? hi : 0.0f;
        s = (hi - lo) / 15.0f;
    } else {
        float amax = fabsf(lo) > fabsf(hi) ? fabsf(lo) : fabsf(hi);
        s = amax / 7.0f;
    }
    s = s > 1e-5f ? s : 1e-5f;
    return round_scale(s, bf16, sbits);
}

/* Codes of one group into q (unsigned nibbles), given its stored scale and zero point. */
static inline void group_codes(const float *x, int64_t k, float s, float zp, int asym,
                               uint8_t *q) {
    float qmin = asym ? 0.0f : -7.0f, qmax = asym ? 15.0f : 7.0f, off = asym ? 0.0f : 8.0f;
    for (int64_t j = 0; j < k; j++) {
        float v = rintf(x[j] / s) + zp;
        v = v < qmin ? qmin : (v > qmax ? qmax : v);
        q[j] = (uint8_t)(int32_t)(v + off);
    }
}

/* One row of fp32 values x: packed bytes (cols/2), scale (g), zp (g, or NULL: symmetric). */
static int row(const float *x, uint32_t *keys, uint8_t *q, int64_t cols, int64_t k, int bf16,
               uint8_t *packed, void *scale_out, uint8_t *zp_out) {
    int bad = 0, asym = zp_out != NULL;
    for (int64_t j = 0; j < cols; j++) keys[j] = key32(f32_to_bits(x[j]));
    for (int64_t gi = 0; gi < cols / k; gi++) {
        const uint32_t *kk = keys + gi * k;
        uint32_t kmin = 0xffffffffu, kmax = 0;
        for (int64_t j = 0; j < k; j++) {
            kmin = kk[j] < kmin ? kk[j] : kmin;
            kmax = kk[j] > kmax ? kk[j] : kmax;
        }
        float lo = bits_to_f32(unkey32(kmin)), hi = bits_to_f32(unkey32(kmax));
        if (!isfinite(lo) || !isfinite(hi)) bad = 1;
        uint16_t sbits = 0;
        float s = group_scale(lo, hi, asym, bf16, &sbits), zp = 0.0f;
        if (asym) {
            zp = rintf(-(lo < 0.0f ? lo : 0.0f) / s);
            zp = zp < 0.0f ? 0.0f : (zp > 15.0f ? 15.0f : zp);
            zp_out[gi] = (uint8_t)zp;
        }
        group_codes(x + gi * k, k, s, zp, asym, q + gi * k);
        if (bf16) ((uint16_t *)scale_out)[gi] = sbits;
        else ((float *)scale_out)[gi] = s;
    }
    for (int64_t j = 0; j < cols / 2; j++)
        packed[j] = (uint8_t)(q[2 * j] | (q[2 * j + 1] << 4));
    return bad;
}

/* bf16 rows skip the fp32 staging buffer: 16-bit keys for the statistics (twice the SIMD
 * lanes) and codes converted on the fly; values and results are the same as row(). */
static inline uint16_t key16(uint16_t u) {
    return (u & 0x8000u) ? (uint16_t)~u : (uint16_t)(u | 0x8000u);
}
static inline float unkey16(uint16_t k) {
    uint16_t u = (k & 0x8000u) ? (uint16_t)(k & 0x7fffu) : (uint16_t)~k;
    return bits_to_f32((uint32_t)u << 16);
}

static inline void group_codes_bf16(const uint16_t *w, int64_t k, float s, float zp, int asym,
                                    uint8_t *q) {
    float qmin = asym ? 0.0f : -7.0f, qmax = asym ? 15.0f : 7.0f, off = asym ? 0.0f : 8.0f;
    for (int64_t j = 0; j < k; j++) {
        float v = rintf(bits_to_f32((uint32_t)w[j] << 16) / s) + zp;
        v = v < qmin ? qmin : (v > qmax ? qmax : v);
        q[j] = (uint8_t)(int32_t)(v + off);
    }
}

static int row_bf16(const uint16_t *w, uint8_t *q, int64_t cols, int64_t k, uint8_t *packed,
                    uint16_t *scale_out, uint8_t *zp_out) {
    int bad = 0, asym = zp_out != NULL;
    for (int64_t gi = 0; gi < cols / k; gi++) {
        const uint16_t *ww = w + gi * k;
        uint16_t kmin = 0xffffu, kmax = 0;
        for (int64_t j = 0; j < k; j++) {
            uint16_t v = key16(ww[j]);
            kmin = v < kmin ? v : kmin;
            kmax = v > kmax ? v : kmax;
        }
        float lo = unkey16(kmin), hi = unkey16(kmax);
        if (!isfinite(lo) || !isfinite(hi)) bad = 1;
        uint16_t sbits = 0;
        float s = group_scale(lo, hi, asym, 1, &sbits), zp = 0.0f;
        if (asym) {
            zp = rintf(-(lo < 0.0f ? lo : 0.0f) / s);
            zp = zp < 0.0f ? 0.0f : (zp > 15.0f ? 15.0f : zp);
            zp_out[gi] = (uint8_t)zp;
        }
        group_codes_bf16(ww, k, s, zp, asym, q + gi * k);
        scale_out[gi] = sbits;
    }
    for (int64_t j = 0; j < cols / 2; j++)
        packed[j] = (uint8_t)(q[2 * j] | (q[2 * j + 1] << 4));
    return bad;
}


/* rows [r0, r1) of a [rows, cols] bf16 (is_bf16=1, uint16 bits) or fp32 matrix. */
int ws_int4_pack_rows(const void *w, int is_bf16, int64_t r0, int64_t r1, int64_t cols,
                      int64_t k, uint8_t *packed, void *scale, uint8_t *zp) {
    float *x = malloc(sizeof(float) * cols);
    uint32_t *keys = malloc(sizeof(uint32_t) * cols);
    uint8_t *q = malloc(cols);
    int64_t g = cols / k;
    int bad = 0;
    for (int64_t r = r0; r < r1; r++) {
        uint8_t *prow = packed + r * (cols / 2), *zrow = zp == NULL ? NULL : zp + r * g;
        if (is_bf16) {
            bad |= row_bf16((const uint16_t *)w + r * cols, q, cols, k, prow,
                            (uint16_t *)scale + r * g, zrow);
        } else {
            memcpy(x, (const float *)w + r * cols, sizeof(float) * cols);
            bad |= row(x, keys, q, cols, k, 0, prow, (float *)scale + r * g, zrow);
        }
    }
    free(x); free(keys); free(q);
    return bad;
}
