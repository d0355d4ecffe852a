/* The GradientMonitor's CPU kernels, fused: one pass per element where the tensor path
 * (lossscale/monitor/_kernel.py) runs a dozen element-wise torch ops and a histogram.
 *
 * Written for lossscale; compiled on first use by lossscale/monitor/_native.py (plain C99, no
 * Python or torch headers) and called through ctypes with the data pointers of contiguous FP32 CPU
 * tensors. Both kernels give exactly the tensor path's counts (tests/test_monitor_native.py compares
 * them bit for bit), so which one runs changes only the speed.
 */
#include <stdint.h>
#include <string.h>

#define NB_BINADES 257

/* Vector widths chosen at load time by the CPU (GCC and clang function multiversioning): the same source
 * compiled for AVX-512, AVX2 and the baseline; every version computes the same integers. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(LS_NO_CLONES)
#define LS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LS_CLONES
#endif
#define SIGN_OFF 0x7FFFFFFFu
#define INF_BITS 0x7F800000u

/* Histogram of keys, and extremes, of |x| over pieces of FP32 data (see _kernel._keys and _Raw):
 *   binade b = ceil((bits) / 2^23) on the magnitude's bit pattern (0: zero; 1: up to 2^-126; 255 holds
 *   inf; 256: NaN), c = #(edges inside binade b below |x|), key = c * 257 + b. The edges come as a list
 *   (edges, tops: MAX_EDGES entries each, see hist_keys) or, when edges is NULL, as the lookup tables
 *   lut[k][b] (K tables of 257 entries; 0x7FFFFFFF where binade b has no k-th edge).
 * counts: int64 [n_rows, stride] row-major; mx[row]: max of min(bits, INF_BITS); mn[row]: min of
 * (bits - 1) & 0x7FFFFFFF (the smallest nonzero |x| as bits - 1; INT32_MAX when none). Piece i holds
 * lens[i] elements at ptrs[i] and belongs to row rows[i]. */
/* Keys, largest and smallest patterns of one block: a loop with no data-dependent stores, so that it
 * vectorises. #(edges inside binade b below a) is counted without table lookups (gathers are slow): each
 * edge e_j lies strictly inside its binade, whose top pattern is top_j, so "binade(a) == binade(e_j) and
 * a > e_j" is "e_j < a <= top_j". Up to MAX_EDGES edges, padded with e = top = 0x7FFFFFFF (never counted);
 * more take the lookup tables (edges_below). */
#define MAX_EDGES 16

static uint32_t edges_below(uint32_t a, uint32_t b, const uint32_t *lut, int32_t k_tables)
{
    uint32_t c = 0;
    for (int32_t k = 0; k < k_tables; ++k) c += (uint32_t)(a > lut[k * NB_BINADES + b]);
    return c;
}

LS_CLONES static void hist_keys(const uint32_t *x, int64_t n, const uint32_t *edges, const uint32_t *tops,
                                const uint32_t *lut, int32_t k_tables, uint32_t *keys, uint32_t *big_out,
                                uint32_t *small_out)
{
    uint32_t big = 0, small = SIGN_OFF;
    if (edges != NULL) {
        for (int64_t i = 0; i < n; ++i) {
            const uint32_t a = x[i] & SIGN_OFF;
            const uint32_t b = (a + 0x7FFFFFu) >> 23;
            uint32_t c = 0;
            for (int j = 0; j < MAX_EDGES; ++j) c += (uint32_t)(a > edges[j]) & (uint32_t)(a <= tops[j]);
            keys[i] = c * NB_BINADES + b;
            const uint32_t g = a < INF_BITS ? a : INF_BITS;
            const uint32_t s = (a - 1u) & SIGN_OFF;
            big = g > big ? g : big;
            small = s < small ? s : small;
        }
    } else {
        for (int64_t i = 0; i < n; ++i) {
            const uint32_t a = x[i] & SIGN_OFF;
            const uint32_t b = (a + 0x7FFFFFu) >> 23;
            keys[i] = edges_below(a, b, lut, k_tables) * NB_BINADES + b;
            const uint32_t g = a < INF_BITS ? a : INF_BITS;
            const uint32_t s = (a - 1u) & SIGN_OFF;
            big = g > big ? g : big;
            small = s < small ? s : small;
        }
    }
    *big_out = big;
    *small_out = small;
}

void ls_hist(int64_t n_pieces, const uint32_t *const *ptrs, const int64_t *lens, const int64_t *rows,
             const uint32_t *edges, const uint32_t *tops, const uint32_t *lut, int32_t k_tables, int64_t stride,
             int64_t *counts, uint32_t *mx, uint32_t *mn, int64_t *scratch)
{
    /* Per block of HIST_BLOCK elements: the keys first (a vectorised pass), then the increments into four
     * interleaved sub-histograms (scratch: 4 * stride int64), so that neighbouring elements falling in the
     * same bin do not wait on each other's increment; the sub-histograms are added into the row at the end
     * of each piece. */
    enum { HIST_BLOCK = 1024 };
    uint32_t keys[HIST_BLOCK];
    for (int64_t piece = 0; piece < n_pieces; ++piece) {
        const uint32_t *x = ptrs[piece];
        const int64_t n = lens[piece];
        const int64_t row = rows[piece];
        int64_t *h = counts + row * stride;
        memset(scratch, 0, (size_t)(4 * stride) * sizeof *scratch);
        int64_t *h0 = scratch, *h1 = scratch + stride, *h2 = scratch + 2 * stride, *h3 = scratch + 3 * stride;
        uint32_t lmx = mx[row], lmn = mn[row];
        for (int64_t start = 0; start < n; start += HIST_BLOCK) {
            const int64_t m = n - start < HIST_BLOCK ? n - start : HIST_BLOCK;
            uint32_t big, small;
            hist_keys(x + start, m, edges, tops, lut, k_tables, keys, &big, &small);
            lmx = big > lmx ? big : lmx;
            lmn = small < lmn ? small : lmn;
            int64_t i = 0;
            for (; i + 4 <= m; i += 4) {
                h0[keys[i]] += 1;
                h1[keys[i + 1]] += 1;
                h2[keys[i + 2]] += 1;
                h3[keys[i + 3]] += 1;
            }
            for (; i < m; ++i) h0[keys[i]] += 1;
        }
        for (int64_t j = 0; j < stride; ++j) h[j] += h0[j] + h1[j] + h2[j] + h3[j];
        mx[row] = lmx;
        mn[row] = lmn;
    }
}

/* Round the magnitude bit pattern a (finite or inf, a <= INF_BITS) to nearest-even in an IEEE-style format
 * with m = 23 - drop stored mantissa bits (m < 23), normal range from min_normal = 2^emin up to max,
 * subnormals, overflow to infinity: the arithmetic of torch's casts to bfloat16, float16 and float8_e5m2 and
 * of lossscale.quantize for "ieee" formats with subnormals. Returns the rounded magnitude's bit pattern.
 *   normal range: add half an ulp minus one plus the lowest kept bit (ties to even), drop the low bits;
 *     past max: infinity.
 *   below min_normal, the subnormal range of multiples of q = 2^(emin - m): with sub_magic = q * 2^23 (a
 *     normal FP32 number), a + sub_magic lies in [sub_magic, 2 * sub_magic), where FP32's spacing is q, so
 *     the addition rounds a to a multiple of q, half to even (the default rounding mode), and the
 *     subtraction is exact (strict IEEE arithmetic: this file is never built with -ffast-math).
 * Branch-free, so that the loops calling it vectorise: both results are computed and one is selected. */
static inline uint32_t round_mag_bits(uint32_t a, uint32_t drop, uint32_t min_normal_bits, uint32_t max_bits,
                                      float sub_magic)
{
    float fa, fs;
    memcpy(&fa, &a, sizeof fa);
    fs = (fa + sub_magic) - sub_magic;
    uint32_t sub;
    memcpy(&sub, &fs, sizeof sub);
    uint32_t norm = (a + ((1u << (drop - 1)) - 1u) + ((a >> drop) & 1u)) & ~((1u << drop) - 1u);
    const uint32_t over = 0u - (uint32_t)(norm > max_bits); /* all ones where the rounding overflows */
    norm = (INF_BITS & over) | (norm & ~over);
    const uint32_t low = 0u - (uint32_t)(a < min_normal_bits);
    return (sub & low) | (norm & ~low);
}

/* Swamping counts (see _kernel._swamping_counts): per element of old/new FP32 weights, updated when
 * new != old, and swamped in format f when also round_f(new) == round_f(old) (floating-point compares:
 * NaN never equal, -0 == +0). Format f: mant[f] stored mantissa bits, sub_magic[f], min_normal[f], maxv[f].
 * out: int64 [n_rows, 1 + n_formats] row-major, added to. */
LS_CLONES void ls_swamp(int64_t n_pieces, const uint32_t *const *olds, const uint32_t *const *news, const int64_t *lens,
              const int64_t *rows, int32_t n_formats, const int32_t *mant, const float *sub_magic,
              const float *min_normal, const float *maxv, int64_t *out)
{
    /* Blocks of SWAMP_BLOCK elements: the formats' passes over one block read it from the L1 cache, so the
     * weights travel from memory once, not once per format. Bitwise &, | rather than &&, ||: no branches,
     * so that the inner loops vectorise. */
    enum { SWAMP_BLOCK = 2048 };
    for (int64_t piece = 0; piece < n_pieces; ++piece) {
        const uint32_t *o = olds[piece];
        const uint32_t *w = news[piece];
        const int64_t n = lens[piece];
        int64_t *acc = out + rows[piece] * (1 + n_formats);
        for (int64_t start = 0; start < n; start += SWAMP_BLOCK) {
            const int64_t stop = start + SWAMP_BLOCK < n ? start + SWAMP_BLOCK : n;
            uint32_t updated = 0;
            for (int64_t i = start; i < stop; ++i) {
                const uint32_t x = o[i], y = w[i];
                const uint32_t a = x & SIGN_OFF, b = y & SIGN_OFF;
                const uint32_t nan_free = (uint32_t)(a <= INF_BITS) & (uint32_t)(b <= INF_BITS);
                const uint32_t equal = (uint32_t)(x == y) | (uint32_t)((a | b) == 0);
                updated += (equal & nan_free) ^ 1u;
            }
            acc[0] += updated;
            for (int32_t f = 0; f < n_formats; ++f) {
                const uint32_t drop = 23u - (uint32_t)mant[f];
                uint32_t min_normal_bits, max_bits;
                memcpy(&min_normal_bits, &min_normal[f], sizeof min_normal_bits);
                memcpy(&max_bits, &maxv[f], sizeof max_bits);
                const float magic = sub_magic[f];
                uint32_t swamped = 0;
                for (int64_t i = start; i < stop; ++i) {
                    const uint32_t x = o[i], y = w[i];
                    const uint32_t a = x & SIGN_OFF, b = y & SIGN_OFF;
                    const uint32_t nan_free = (uint32_t)(a <= INF_BITS) & (uint32_t)(b <= INF_BITS);
                    const uint32_t changed = ((uint32_t)(x == y) | (uint32_t)((a | b) == 0)) ^ 1u;
                    const uint32_t ra = round_mag_bits(a, drop, min_normal_bits, max_bits, magic);
                    const uint32_t rb = round_mag_bits(b, drop, min_normal_bits, max_bits, magic);
                    const uint32_t equal = ((uint32_t)(ra == rb) & (uint32_t)(((x ^ y) >> 31) == 0)) |
                                           (uint32_t)((ra | rb) == 0);
                    swamped += changed & equal & nan_free;
                }
                acc[1 + f] += swamped;
            }
        }
    }
}

/* For the tests: round n values with the swamping kernel's rounding (round_mag_bits, sign kept; NaN stays). */
void ls_round_ieee(const uint32_t *x, uint32_t *y, int64_t n, int32_t m, float sub_magic, float min_normal, float maxv)
{
    uint32_t min_normal_bits, max_bits;
    memcpy(&min_normal_bits, &min_normal, sizeof min_normal_bits);
    memcpy(&max_bits, &maxv, sizeof max_bits);
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t a = x[i] & SIGN_OFF;
        y[i] = a > INF_BITS ? x[i]
                            : (x[i] & ~SIGN_OFF) | round_mag_bits(a, 23u - (uint32_t)m, min_normal_bits, max_bits,
                                                                  sub_magic);
    }
}
