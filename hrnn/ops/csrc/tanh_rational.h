// tanh in float: a rational minimax approximation (Eigen's single-precision coefficients, clamp
// at +-7.9053, beyond which tanh rounds to +-1 within 2.4e-7); max relative error measured
// 3.4e-7 against double tanh over [-12, 12]. V is float or a GCC vector of floats.
//
// Included INSIDE a namespace by each build (through vectors.h, once per capability; leaky_scan.cpp
// for the portable path), so every build compiles its own copy: one template shared by the
// builds could be linked once, with one build's instructions, for all of them. Hence no
// include guard and no includes.
template <typename V>
inline V tanh_rational(V x) {
  const V hi = V{} + 7.90531110763549805f, lo = V{} - 7.90531110763549805f;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const V x2 = x * x;
  V p = V{} + -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * x;
  V q = V{} + 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return p / q;
}
