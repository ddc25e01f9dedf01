// Pointwise helpers shared by our C++ kernels: a vectorisable float exp, and loads and stores
// that compute in float for bfloat16 storage (integer conversions only, so loops still vectorise;
// stores round to nearest even).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

__attribute__((always_inline)) inline float exp_poly(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // Cody-Waite: x - n ln 2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return y * __builtin_bit_cast(float, bits);
}

__attribute__((always_inline)) inline float sigmoid_fast(float x) { return 1.0f / (1.0f + exp_poly(-x)); }
__attribute__((always_inline)) inline float tanh_fast(float x) { return 2.0f / (1.0f + exp_poly(-2.0f * x)) - 1.0f; }
inline double sigmoid_fast(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline double tanh_fast(double x) { return std::tanh(x); }

// log(y) for y > 0 in float, vectorisable: y = 2^e m with m in [sqrt(1/2), sqrt 2), then
// log m = 2 atanh(s), s = (m - 1) / (m + 1), as a series in s^2 (|s| < 0.172: about 1 ulp)
__attribute__((always_inline)) inline float log_poly(float y) {
  int32_t bits = __builtin_bit_cast(int32_t, y);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  float m = __builtin_bit_cast(float, (bits & 0x7fffff) | 0x3f800000);  // [1, 2)
  bool high = m > 1.41421356f;
  m = high ? m * 0.5f : m;
  e = high ? e + 1 : e;
  float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  float series = 1.0f + s2 * (0.333333333f + s2 * (0.2f + s2 * (0.142857143f + s2 * 0.111111111f)));
  return float(e) * 0.693147181f + 2.0f * s * series;
}

// log σ(x) = min(x, 0) - log(1 + e^-|x|), exact for large |x| in either direction
__attribute__((always_inline)) inline float log_sigmoid(float x) { return std::min(x, 0.0f) - log_poly(1.0f + exp_poly(-std::abs(x))); }
inline double log_sigmoid(double x) { return std::min(x, 0.0) - std::log1p(std::exp(-std::abs(x))); }
__attribute__((always_inline)) inline float exp_fast(float x) { return exp_poly(x); }
inline double exp_fast(double x) { return std::exp(x); }

// float for bfloat16 storage, the type itself otherwise; load/store convert with integer
// operations only, so the loops still vectorise (stores round to nearest even)
template <typename T> struct Math { using type = T; };
template <> struct Math<at::BFloat16> { using type = float; };

template <typename T> __attribute__((always_inline)) inline typename Math<T>::type load(const T* p, int64_t j) { return p[j]; }
template <typename T> __attribute__((always_inline)) inline void store(T* p, int64_t j, typename Math<T>::type v) { p[j] = v; }
template <> inline float load(const at::BFloat16* p, int64_t j) {
  uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[j]) << 16;
  return __builtin_bit_cast(float, bits);
}
template <> inline void store(at::BFloat16* p, int64_t j, float v) {
  uint32_t bits = __builtin_bit_cast(uint32_t, v);
  bits += 0x7FFF + ((bits >> 16) & 1);
  reinterpret_cast<uint16_t*>(p)[j] = static_cast<uint16_t>(bits >> 16);
}

}  // namespace
