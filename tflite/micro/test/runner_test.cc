// Host test of EarlyExitRunner: segments are small arithmetic functions with
// known results (not TFLite Micro), so routing, carry hand-off,
// requantization and thresholds are checked exactly. Build: `make test`.

#include <cmath>
#include <cstdio>
#include <cstring>

#include "earlyexit_runner.h"
#include "test/check.h"

namespace {

using earlyexit::CarryConfig;
using earlyexit::DType;
using earlyexit::EarlyExitRunner;
using earlyexit::InputData;
using earlyexit::ModelConfig;
using earlyexit::Result;
using earlyexit::Segment;
using earlyexit::SegmentConfig;
using earlyexit::Status;
using earlyexit::TensorConfig;
using earlyexit::TensorDesc;

constexpr int kMaxTensors = 4;
constexpr size_t kBufferBytes = 64;

// A segment whose Invoke applies `fn` to plain byte buffers. Its tensors
// are those of a SegmentConfig (inputs; logits, confidence and carry
// outputs) at their positions; a test may alter a description afterwards.
class FakeSegment : public Segment {
 public:
  using Fn = bool (*)(FakeSegment&);

  FakeSegment(Fn fn, const SegmentConfig& config) : fn_(fn) {
    for (int i = 0; i < config.num_inputs; ++i) Add(in_desc, in, config.inputs[i]);
    Add(out_desc, out, config.logits);
    Add(out_desc, out, config.confidence);
    for (int j = 0; j < config.num_carry; ++j) Add(out_desc, out, config.carry[j].source);
  }
  TensorDesc input(int p) override { return Valid(p) ? in_desc[p] : TensorDesc(); }
  TensorDesc output(int p) override { return Valid(p) ? out_desc[p] : TensorDesc(); }
  bool Invoke() override {
    ++invocations;
    return fn_(*this);
  }
  int8_t* in8(int p) { return reinterpret_cast<int8_t*>(in[p]); }
  int8_t* out8(int p) { return reinterpret_cast<int8_t*>(out[p]); }
  float* inf(int p) { return reinterpret_cast<float*>(in[p]); }
  float* outf(int p) { return reinterpret_cast<float*>(out[p]); }
  int32_t* in32(int p) { return reinterpret_cast<int32_t*>(in[p]); }
  int32_t* out32(int p) { return reinterpret_cast<int32_t*>(out[p]); }

  alignas(16) uint8_t in[kMaxTensors][kBufferBytes] = {};
  alignas(16) uint8_t out[kMaxTensors][kBufferBytes] = {};
  TensorDesc in_desc[kMaxTensors];
  TensorDesc out_desc[kMaxTensors];
  int invocations = 0;

 private:
  static bool Valid(int p) { return p >= 0 && p < kMaxTensors; }
  static void Add(TensorDesc* descs, uint8_t (*buffers)[kBufferBytes],
                  const TensorConfig& t) {
    descs[t.position] = {buffers[t.position], t.bytes, t.dtype, t.scale, t.zero_point};
  }
  Fn fn_;
};

int8_t Saturate(int v) { return static_cast<int8_t>(v < -128 ? -128 : v > 127 ? 127 : v); }

// --- An int8 model of three segments on a 4-vector x --------------------
// Output positions are shuffled as the TFLite converter does, so the runner
// must use the config's positions. Confidence is read from the data, so a
// test chooses where a sample leaves.
//   segment 1: carry = x + 1 (pos 2), logits = x[0..2] (pos 0), conf = x[3] (pos 1)
//   segment 2: carry = 2 y (pos 0), logits = -y[0..2] (pos 1), conf = y[0] (pos 2)
//   segment 3: logits = z[0..2] (pos 1), conf = z[3] (pos 0)
bool Segment1(FakeSegment& s) {
  for (int i = 0; i < 4; ++i) s.out8(2)[i] = Saturate(s.in8(0)[i] + 1);
  for (int i = 0; i < 3; ++i) s.out8(0)[i] = s.in8(0)[i];
  s.out8(1)[0] = s.in8(0)[3];
  return true;
}
bool Segment2(FakeSegment& s) {
  for (int i = 0; i < 4; ++i) s.out8(0)[i] = Saturate(2 * s.in8(0)[i]);
  for (int i = 0; i < 3; ++i) s.out8(1)[i] = Saturate(-s.in8(0)[i]);
  s.out8(2)[0] = s.in8(0)[0];
  return true;
}
bool Segment3(FakeSegment& s) {
  for (int i = 0; i < 3; ++i) s.out8(1)[i] = s.in8(0)[i];
  s.out8(0)[0] = s.in8(0)[3];
  return true;
}
bool Fails(FakeSegment&) { return false; }

// Confidence in [0, 1] as int8 with scale 1/256 and zero point -128 (the
// parameters of a softmax output).
constexpr float kConfScale = 1.0f / 256.0f;

constexpr TensorConfig Int8(int position, int n, float scale = 0.5f, int32_t zp = 0) {
  return TensorConfig{"t", position, DType::kInt8, 2, {1, n}, static_cast<size_t>(n),
                      scale, zp};
}

constexpr TensorConfig kIn1[] = {Int8(0, 4)};
constexpr TensorConfig kIn2[] = {Int8(0, 4)};
constexpr TensorConfig kIn3[] = {Int8(0, 4)};
constexpr CarryConfig kCarry1[] = {{Int8(2, 4), Int8(0, 4), false}};
constexpr CarryConfig kCarry2[] = {{Int8(0, 4), Int8(0, 4), false}};

// threshold 0.5 -> smallest int8 with (q + 128) / 256 >= 0.5 is 0.
constexpr SegmentConfig kSegments[] = {
    {"exit_1", nullptr, 0, kIn1, 1, Int8(0, 3), Int8(1, 1, kConfScale, -128),
     kCarry1, 1, 0.5f, 0, 10},
    {"exit_2", nullptr, 0, kIn2, 1, Int8(1, 3), Int8(2, 1, kConfScale, -128),
     kCarry2, 1, 0.5f, 0, 20},
    {"final", nullptr, 0, kIn3, 1, Int8(1, 3), Int8(0, 1, kConfScale, -128),
     nullptr, 0, 0.0f, -128, 30},
};
constexpr ModelConfig kModel = {kSegments, 3, 3, 1024, 16};

struct Int8Fixture {
  explicit Int8Fixture(const ModelConfig& model = kModel)
      : runner{model, segments, carry, sizeof(carry)} {}
  FakeSegment s1{Segment1, kSegments[0]};
  FakeSegment s2{Segment2, kSegments[1]};
  FakeSegment s3{Segment3, kSegments[2]};
  Segment* segments[3] = {&s1, &s2, &s3};
  alignas(16) uint8_t carry[16] = {};
  EarlyExitRunner runner;
};

Result RunOrFail(EarlyExitRunner& runner, const int8_t* x) {
  Result result = {-1, -1, -1.0f};
  CHECK_EQ(runner.Run(x, &result), Status::kOk);
  return result;
}

void TestExitsAtFirstConfidentSegment() {
  Int8Fixture f;
  CHECK_EQ(f.runner.Init(), Status::kOk);
  // Segment 1 confidence x[3] = 0 reaches the quantized threshold 0.
  const int8_t x[4] = {5, 9, -2, 0};
  const Result r = RunOrFail(f.runner, x);
  CHECK_EQ(r.exit_index, 0);
  CHECK_EQ(r.label, 1);                // argmax of (5, 9, -2)
  CHECK(r.confidence == 0.5f);         // (0 + 128) / 256
  CHECK_EQ(f.s1.invocations, 1);
  CHECK_EQ(f.s2.invocations, 0);       // later segments are not computed
  CHECK_EQ(f.s3.invocations, 0);
  CHECK_EQ(f.runner.exit_count(0), 1u);
}

void TestCarryReachesLaterSegments() {
  Int8Fixture f;
  CHECK_EQ(f.runner.Init(), Status::kOk);
  // conf1 = -1 < 0; segment 2 gets y = x + 1 = (0, ...): conf2 = y[0] = 0.
  const int8_t x[4] = {-1, 3, 7, -1};
  const Result r = RunOrFail(f.runner, x);
  CHECK_EQ(r.exit_index, 1);
  CHECK_EQ(r.label, 0);                // argmax of -(0, 4, 8)
  CHECK_EQ(f.s2.in8(0)[1], 4);
  CHECK_EQ(f.s2.in8(0)[3], 0);
  // y[0] = -5 < 0: on to segment 3 with z = 2 y.
  const int8_t x2[4] = {-6, 100, 2, -1};
  const Result r2 = RunOrFail(f.runner, x2);
  CHECK_EQ(r2.exit_index, 2);
  const int8_t expected_z[4] = {-10, 127, 6, 0};  // 2 * 101 saturates
  CHECK(std::memcmp(f.s3.in8(0), expected_z, 4) == 0);
  CHECK_EQ(r2.label, 1);
  CHECK(r2.confidence == 0.5f);
  CHECK_EQ(f.runner.exit_count(1), 1u);
  CHECK_EQ(f.runner.exit_count(2), 1u);
  CHECK_EQ(f.runner.invocations(0), 2u);
  CHECK_EQ(f.runner.invocations(2), 1u);
}

void TestThresholdOfOneSendsEverySampleToTheFinalExit() {
  Int8Fixture f;
  CHECK_EQ(f.runner.Init(), Status::kOk);
  const float never[2] = {1.0f, 1.0f};  // quantized 128: above every int8
  CHECK_EQ(f.runner.SetThresholds(never, 2), Status::kOk);
  CHECK_EQ(f.runner.threshold_quantized(0), 128);
  const int8_t x[4] = {1, 2, 3, 127};
  CHECK_EQ(RunOrFail(f.runner, x).exit_index, 2);
  const float zero[2] = {0.0f, 0.0f};  // every int8 confidence reaches 0
  CHECK_EQ(f.runner.SetThresholds(zero, 2), Status::kOk);
  const int8_t low[4] = {1, 2, 3, -128};
  CHECK_EQ(RunOrFail(f.runner, low).exit_index, 0);
  const float bad[2] = {0.5f, 1.5f};
  CHECK_EQ(f.runner.SetThresholds(bad, 2), Status::kBadThreshold);
  const float nan[2] = {0.5f, std::nanf("")};
  CHECK_EQ(f.runner.SetThresholds(nan, 2), Status::kBadThreshold);
  CHECK_EQ(f.runner.SetThresholds(zero, 1), Status::kBadThreshold);
  CHECK_EQ(f.runner.SetThresholds(nullptr, 2), Status::kBadThreshold);
}

void TestSetThresholdsBeforeInitIsKept() {
  Int8Fixture f;
  const float never[2] = {1.0f, 1.0f};
  CHECK_EQ(f.runner.SetThresholds(never, 2), Status::kOk);
  CHECK_EQ(f.runner.Init(), Status::kOk);
  CHECK(f.runner.threshold(0) == 1.0f);
  CHECK_EQ(f.runner.threshold_quantized(1), 128);
  const int8_t confident[4] = {1, 2, 3, 127};  // would leave at 0.5
  CHECK_EQ(RunOrFail(f.runner, confident).exit_index, 2);
  // Without SetThresholds, Init takes the config's quantized thresholds.
  Int8Fixture g;
  CHECK_EQ(g.runner.Init(), Status::kOk);
  CHECK_EQ(g.runner.threshold_quantized(0), 0);
  CHECK_EQ(RunOrFail(g.runner, confident).exit_index, 0);
}

void TestQuantizeThresholdIsTheFloat32Scan() {
  // Values from keras_earlyexit.runtime.manifest.quantize_threshold.
  CHECK_EQ(earlyexit::QuantizeThreshold(0.5f, 1.0f / 256, -128), 0);
  CHECK_EQ(earlyexit::QuantizeThreshold(0.3f, 1.0f / 255, -128), -51);
  CHECK_EQ(earlyexit::QuantizeThreshold(1.0f, 1.0f / 256, -128), 128);
  CHECK_EQ(earlyexit::QuantizeThreshold(0.9f, 0.0005154499085620046f, -128), 128);
  CHECK_EQ(earlyexit::QuantizeThreshold(0.0f, 1.0f / 256, -128), -128);
  CHECK_EQ(earlyexit::QuantizeThreshold(0.7f, 0.5f, 3), 5);
  // On a float32 level, where a double computation rounds the other way:
  // (-125 + 128) * float32(1/255) rounds to exactly this threshold.
  CHECK_EQ(earlyexit::QuantizeThreshold(0.011764707043766975f, 0.003921568859368563f,
                                        -128),
           -125);
  // The smallest positive float is above level -128 (= 0.0).
  CHECK_EQ(earlyexit::QuantizeThreshold(1.401298464324817e-45f, 1.0f / 256, -128),
           -127);
  CHECK_EQ(earlyexit::QuantizeThreshold(std::nanf(""), 1.0f / 256, -128), 128);
}

void TestQuantizeRoundsHalfAwayFromZero() {
  const float x[6] = {0.25f, -0.25f, 0.75f, 100.0f, -100.0f, 0.0f};
  int8_t q[6];
  CHECK_EQ(earlyexit::Quantize(x, q, 6, 0.5f, 3), Status::kOk);
  const int8_t expected[6] = {4, 2, 5, 127, -128, 3};  // 0.5 -> 1, -0.5 -> -1
  CHECK(std::memcmp(q, expected, 6) == 0);
}

void TestQuantizeRefusesNonFiniteValues() {
  const float nan[3] = {0.25f, std::nanf(""), 0.5f};
  const float inf[2] = {HUGE_VALF, 0.0f};
  int8_t q[3] = {55, 55, 55};
  CHECK_EQ(earlyexit::Quantize(nan, q, 3, 0.5f, 0), Status::kNonFiniteInput);
  CHECK_EQ(earlyexit::Quantize(inf, q, 2, 0.5f, 0), Status::kNonFiniteInput);
  CHECK(q[0] == 55 && q[1] == 55 && q[2] == 55);  // nothing half-written
  CHECK_EQ(earlyexit::Quantize(nan, q, 1, 0.0f, 0), Status::kBadInput);
  CHECK_EQ(earlyexit::Quantize(nan, q, 1, std::nanf(""), 0), Status::kBadInput);
  CHECK_EQ(earlyexit::Quantize(nan, q, 1, 0.5f, 128), Status::kBadInput);
}

// --- Requantized carry, and two carry tensors ----------------------------
//   segment 1: outputs a = x (pos 0, 6 bytes, scale 0.5), b = x[0..4] (pos 3,
//   5 bytes, scale 1.0), logits (pos 1), conf (pos 2) = x[5].
//   segment 2 takes b at input 0 (same parameters: copied) and a at input 1
//   with scale 0.25, zero point -10 (requantized).
bool TwoCarrySegment1(FakeSegment& s) {
  std::memcpy(s.out[0], s.in[0], 6);
  std::memcpy(s.out[3], s.in[0], 5);
  std::memcpy(s.out[1], s.in[0], 3);
  s.out8(2)[0] = s.in8(0)[5];
  return true;
}
bool TwoInputSegment(FakeSegment& s) {
  s.out8(0)[0] = 127;  // confidence
  for (int i = 0; i < 3; ++i) s.out8(1)[i] = s.in8(1)[i];
  return true;
}

constexpr TensorConfig kTwoIn1[] = {Int8(0, 6)};
constexpr TensorConfig kTwoIn2[] = {Int8(0, 5, 1.0f, 0), Int8(1, 6, 0.25f, -10)};
constexpr CarryConfig kTwoCarry[] = {
    {Int8(3, 5, 1.0f, 0), Int8(0, 5, 1.0f, 0), false},
    {Int8(0, 6, 0.5f, 0), Int8(1, 6, 0.25f, -10), true},
};
constexpr SegmentConfig kTwoSegments[] = {
    {"exit_1", nullptr, 0, kTwoIn1, 1, Int8(1, 3), Int8(2, 1, kConfScale, -128),
     kTwoCarry, 2, 0.5f, 0, 1},
    {"final", nullptr, 0, kTwoIn2, 2, Int8(1, 3), Int8(0, 1, kConfScale, -128),
     nullptr, 0, 0.0f, -128, 1},
};
constexpr ModelConfig kTwoModel = {kTwoSegments, 2, 3, 1024, 32};

void TestRequantizedAndAlignedCarries() {
  FakeSegment s1{TwoCarrySegment1, kTwoSegments[0]};
  FakeSegment s2{TwoInputSegment, kTwoSegments[1]};
  Segment* segments[2] = {&s1, &s2};
  alignas(16) uint8_t carry[32];
  EarlyExitRunner runner{kTwoModel, segments, carry, sizeof(carry)};
  CHECK_EQ(runner.Init(), Status::kOk);
  const int8_t x[6] = {3, -3, 100, -128, 1, -1};
  const Result r = RunOrFail(runner, x);
  CHECK_EQ(r.exit_index, 1);
  // a: q * 0.5 / 0.25 - 10, rounded half away from zero, saturated.
  const int8_t expected_a[6] = {-4, -16, 127, -128, -8, -12};
  CHECK(std::memcmp(s2.in8(1), expected_a, 6) == 0);
  // b: byte for byte (same parameters on both sides).
  CHECK(std::memcmp(s2.in8(0), x, 5) == 0);
  CHECK_EQ(r.label, 2);  // argmax of (-4, -16, 127)
  // A carry buffer below the two aligned tensors (16 + 16 bytes) is refused.
  EarlyExitRunner small{kTwoModel, segments, carry, 31};
  CHECK_EQ(small.Init(), Status::kCarryBufferTooSmall);
}

// --- A model whose first segment takes two inputs ------------------------
constexpr SegmentConfig kTwoInputSegments[] = {
    {"final", nullptr, 0, kTwoIn2, 2, Int8(1, 3), Int8(0, 1, kConfScale, -128),
     nullptr, 0, 0.0f, -128, 1},
};
constexpr ModelConfig kTwoInputModel = {kTwoInputSegments, 1, 3, 1024, 16};

void TestSingleInputRunOnATwoInputModelIsRefused() {
  FakeSegment s{TwoInputSegment, kTwoInputSegments[0]};
  Segment* segments[1] = {&s};
  EarlyExitRunner runner{kTwoInputModel, segments, nullptr, 0};
  CHECK_EQ(runner.Init(), Status::kOk);
  const int8_t b[5] = {};
  const int8_t a[6] = {1, 9, 2, 0, 0, 0};
  Result r = {};
  CHECK_EQ(runner.Run(static_cast<const void*>(a), &r), Status::kBadInput);
  CHECK_EQ(s.invocations, 0);
  const void* both[2] = {b, a};
  CHECK_EQ(runner.Run(both, &r), Status::kOk);
  CHECK_EQ(r.label, 1);
  const void* missing[2] = {b, nullptr};
  CHECK_EQ(runner.Run(missing, &r), Status::kBadInput);
  CHECK_EQ(runner.Run(both, nullptr), Status::kBadInput);
  CHECK_EQ(runner.Run(static_cast<const void* const*>(nullptr), &r), Status::kBadInput);
}

// --- Float32 bundle: float confidences compared with float thresholds ----
bool FloatSegment1(FakeSegment& s) {
  s.outf(0)[0] = s.inf(0)[0];  // confidence = x[0]
  s.outf(1)[0] = 0.0f;         // logits
  s.outf(1)[1] = 1.0f;
  std::memcpy(s.out[2], s.in[0], 8);
  return true;
}
bool FloatSegment2(FakeSegment& s) {
  s.outf(0)[0] = s.inf(0)[1];
  s.outf(1)[0] = 2.0f;
  s.outf(1)[1] = 2.0f;  // tie: the first index wins, as numpy.argmax
  return true;
}

constexpr TensorConfig Float(int position, int n) {
  return TensorConfig{"f", position, DType::kFloat32, 2, {1, n},
                      static_cast<size_t>(4 * n), 0.0f, 0};
}
constexpr TensorConfig kFloatIn[] = {Float(0, 2)};
constexpr CarryConfig kFloatCarry[] = {{Float(2, 2), Float(0, 2), false}};
constexpr SegmentConfig kFloatSegments[] = {
    {"exit_1", nullptr, 0, kFloatIn, 1, Float(1, 2), Float(0, 1), kFloatCarry, 1,
     0.75f, 0, 1},
    {"final", nullptr, 0, kFloatIn, 1, Float(1, 2), Float(0, 1), nullptr, 0, 0.0f, 0,
     1},
};
constexpr ModelConfig kFloatModel = {kFloatSegments, 2, 2, 1024, 16};

void TestFloatBundle() {
  FakeSegment s1{FloatSegment1, kFloatSegments[0]};
  FakeSegment s2{FloatSegment2, kFloatSegments[1]};
  Segment* segments[2] = {&s1, &s2};
  alignas(16) uint8_t carry[16];
  EarlyExitRunner runner{kFloatModel, segments, carry, sizeof(carry)};
  CHECK_EQ(runner.Init(), Status::kOk);
  const float confident[2] = {0.75f, 0.1f};
  Result r = {};
  CHECK_EQ(runner.Run(confident, &r), Status::kOk);
  CHECK_EQ(r.exit_index, 0);
  CHECK_EQ(r.label, 1);
  CHECK(r.confidence == 0.75f);
  const float unsure[2] = {0.7499f, 0.25f};
  CHECK_EQ(runner.Run(unsure, &r), Status::kOk);
  CHECK_EQ(r.exit_index, 1);
  CHECK_EQ(r.label, 0);
  CHECK(r.confidence == 0.25f);  // carried x[1]
  // A saturated softmax reaches exactly 1.0; a threshold of 1.0 still
  // sends the sample on.
  const float never[1] = {1.0f};
  CHECK_EQ(runner.SetThresholds(never, 1), Status::kOk);
  const float saturated[2] = {1.0f, 0.5f};
  CHECK_EQ(runner.Run(saturated, &r), Status::kOk);
  CHECK_EQ(r.exit_index, 1);
  // NaN or infinite inputs are refused before any segment runs.
  const int before = s1.invocations;
  const float nan[2] = {0.5f, std::nanf("")};
  const float inf[2] = {-HUGE_VALF, 0.5f};
  CHECK_EQ(runner.Run(nan, &r), Status::kNonFiniteInput);
  CHECK_EQ(runner.Run(inf, &r), Status::kNonFiniteInput);
  CHECK_EQ(s1.invocations, before);
}

// --- Patience (PABEE) over the int8 model above ------------------------
// Segment 1's class is argmax x[0..2], segment 2's argmax -(x[0..2] + 1),
// i.e. the first smallest x: equal x values give class 0 at both.
void TestPatienceNeedsAgreeingExits() {
  ModelConfig model = kModel;
  model.patience = 2;
  Int8Fixture f(model);
  CHECK_EQ(f.runner.Init(), Status::kOk);
  CHECK_EQ(f.runner.patience(), 2);
  // Confident at exit 1 (x[3] = 0 reaches 0.5) but a streak of 1: on; exit 2
  // predicts class 2, not 1: streak 1 again; the final exit takes it.
  const int8_t disagree[4] = {5, 9, -2, 0};
  Result r = RunOrFail(f.runner, disagree);
  CHECK_EQ(r.exit_index, 2);
  CHECK_EQ(r.label, 1);
  CHECK_EQ(f.s2.invocations, 1);
  // Class 0 at exits 1 and 2 (streak 2) and y[0] = 1 reaches the floor.
  const int8_t agree[4] = {0, 0, 0, 0};
  r = RunOrFail(f.runner, agree);
  CHECK_EQ(r.exit_index, 1);
  CHECK_EQ(r.label, 0);
  CHECK(r.confidence == (1 + 128) / 256.0f);
  // The same agreement below the confidence floor (y[0] = -2 < 0): on.
  const int8_t unsure[4] = {-3, -3, -3, -3};
  CHECK_EQ(RunOrFail(f.runner, unsure).exit_index, 2);
  // The floor is the threshold: 0 lets any agreeing sample leave.
  const float zero[2] = {0.0f, 0.0f};
  CHECK_EQ(f.runner.SetThresholds(zero, 2), Status::kOk);
  CHECK_EQ(RunOrFail(f.runner, unsure).exit_index, 1);
  // The streak starts again with each sample.
  CHECK_EQ(RunOrFail(f.runner, disagree).exit_index, 2);
  CHECK_EQ(f.runner.exit_count(1), 2u);
  CHECK_EQ(f.runner.exit_count(2), 3u);

  // Patience 1: the threshold alone decides, as for other criteria.
  CHECK_EQ(f.runner.SetPatience(1), Status::kOk);
  CHECK_EQ(f.runner.patience(), 1);
  CHECK_EQ(RunOrFail(f.runner, disagree).exit_index, 0);
  // Patience 3 (every exit): no non-final exit reaches a streak of 3.
  CHECK_EQ(f.runner.SetPatience(3), Status::kOk);
  CHECK_EQ(RunOrFail(f.runner, agree).exit_index, 2);
  // Set before Init: kept instead of the config's.
  Int8Fixture before(model);
  CHECK_EQ(before.runner.SetPatience(1), Status::kOk);
  CHECK_EQ(before.runner.Init(), Status::kOk);
  CHECK_EQ(before.runner.patience(), 1);
  CHECK_EQ(RunOrFail(before.runner, disagree).exit_index, 0);
}

void TestBadPatienceIsRefused() {
  // SetPatience: 1 to the number of exits, for a patience model only.
  ModelConfig model = kModel;
  model.patience = 2;
  Int8Fixture f(model);
  CHECK_EQ(f.runner.Init(), Status::kOk);
  CHECK_EQ(f.runner.SetPatience(0), Status::kBadPatience);
  CHECK_EQ(f.runner.SetPatience(4), Status::kBadPatience);
  CHECK_EQ(f.runner.SetPatience(-2), Status::kBadPatience);
  CHECK_EQ(f.runner.patience(), 2);  // unchanged
  Int8Fixture max_prob;
  CHECK_EQ(max_prob.runner.SetPatience(2), Status::kBadPatience);
  CHECK_EQ(max_prob.runner.Init(), Status::kOk);
  CHECK_EQ(max_prob.runner.patience(), 0);
  // In the config: 0 (another criterion) or 1 to the number of exits.
  const int bad[] = {-1, 4, 1000};
  for (int patience : bad) {
    ModelConfig model = kModel;
    model.patience = patience;
    Int8Fixture f(model);
    CHECK_EQ(f.runner.Init(), Status::kBadConfig);
    Result r = {};
    const int8_t x[4] = {};
    CHECK_EQ(f.runner.Run(x, &r), Status::kBadConfig);
    CHECK_EQ(f.s1.invocations, 0);
  }
}

// --- int32 token ids -------------------------------------------------------
//   segment 1: ids (int32, 4 values in [0, 9]) -> logits = ids[0..2] as
//   floats (pos 0), confidence = ids[3] / 10 (pos 1), carry ids (pos 2)
//   segment 2: logits = -ids[0..2] (pos 0), confidence 1 (pos 1)
bool TokenSegment1(FakeSegment& s) {
  for (int i = 0; i < 3; ++i) s.outf(0)[i] = static_cast<float>(s.in32(0)[i]);
  s.outf(1)[0] = static_cast<float>(s.in32(0)[3]) / 10.0f;
  std::memcpy(s.out[2], s.in[0], 16);
  return true;
}
bool TokenSegment2(FakeSegment& s) {
  for (int i = 0; i < 3; ++i) s.outf(0)[i] = -static_cast<float>(s.in32(0)[i]);
  s.outf(1)[0] = 1.0f;
  return true;
}

constexpr TensorConfig Int32(int position, int n, int32_t lo = INT32_MIN,
                             int32_t hi = INT32_MAX) {
  return TensorConfig{"ids", position, DType::kInt32, 2, {1, n},
                      static_cast<size_t>(4 * n), 0.0f, 0, lo, hi};
}
constexpr TensorConfig kTokenIn1[] = {Int32(0, 4, 0, 9)};
constexpr TensorConfig kTokenIn2[] = {Int32(0, 4)};
constexpr CarryConfig kTokenCarry[] = {{Int32(2, 4), Int32(0, 4), false}};
constexpr SegmentConfig kTokenSegments[] = {
    {"exit_1", nullptr, 0, kTokenIn1, 1, Float(0, 3), Float(1, 1), kTokenCarry, 1,
     0.5f, 0, 1},
    {"final", nullptr, 0, kTokenIn2, 1, Float(0, 3), Float(1, 1), nullptr, 0, 0.0f,
     0, 1},
};
constexpr ModelConfig kTokenModel = {kTokenSegments, 2, 3, 1024, 16};

struct TokenFixture {
  explicit TokenFixture(const ModelConfig& model = kTokenModel)
      : runner{model, segments, carry, sizeof(carry)} {}
  FakeSegment s1{TokenSegment1, kTokenSegments[0]};
  FakeSegment s2{TokenSegment2, kTokenSegments[1]};
  Segment* segments[2] = {&s1, &s2};
  alignas(16) uint8_t carry[16] = {};
  EarlyExitRunner runner;
};

void TestInt32TokenInputs() {
  TokenFixture f;
  CHECK_EQ(f.runner.Init(), Status::kOk);
  const int32_t confident[4] = {1, 7, 3, 5};
  Result r = {};
  CHECK_EQ(f.runner.Run(confident, &r), Status::kOk);
  CHECK_EQ(r.exit_index, 0);
  CHECK_EQ(r.label, 1);
  CHECK(r.confidence == 0.5f);
  // The ids are carried as they are (int32: never requantized).
  const int32_t unsure[4] = {9, 0, 4, 4};
  const InputData checked[1] = {{unsure, sizeof(unsure), DType::kInt32}};
  CHECK_EQ(f.runner.Run(checked, 1, &r), Status::kOk);
  CHECK_EQ(r.exit_index, 1);
  CHECK_EQ(r.label, 1);  // argmax of -(9, 0, 4)
  CHECK(std::memcmp(f.s2.in32(0), unsure, sizeof(unsure)) == 0);
  CHECK_EQ(f.s1.invocations, 2);

  // Ids outside [0, 9] (the embedding's rows) are refused before any
  // segment runs, through either Run.
  const int32_t above[4] = {1, 10, 3, 5};
  const int32_t below[4] = {1, 2, -1, 5};
  const int32_t most[4] = {1, 2, INT32_MIN, INT32_MAX};
  CHECK_EQ(f.runner.Run(above, &r), Status::kInputOutOfRange);
  CHECK_EQ(f.runner.Run(below, &r), Status::kInputOutOfRange);
  CHECK_EQ(f.runner.Run(most, &r), Status::kInputOutOfRange);
  const InputData out_of_range[1] = {{above, sizeof(above), DType::kInt32}};
  CHECK_EQ(f.runner.Run(out_of_range, 1, &r), Status::kInputOutOfRange);
  // The checked Run: dtype, byte count, input count and null pointers.
  const float floats[4] = {1.0f, 7.0f, 3.0f, 5.0f};
  const InputData as_floats[1] = {{floats, sizeof(floats), DType::kFloat32}};
  CHECK_EQ(f.runner.Run(as_floats, 1, &r), Status::kBadInput);
  const InputData as_int8[1] = {{confident, 4, DType::kInt8}};
  CHECK_EQ(f.runner.Run(as_int8, 1, &r), Status::kBadInput);
  const InputData short_ids[1] = {{confident, 12, DType::kInt32}};
  CHECK_EQ(f.runner.Run(short_ids, 1, &r), Status::kBadInput);
  const InputData long_ids[1] = {{confident, 20, DType::kInt32}};
  CHECK_EQ(f.runner.Run(long_ids, 1, &r), Status::kBadInput);
  const InputData null_ids[1] = {{nullptr, 16, DType::kInt32}};
  CHECK_EQ(f.runner.Run(null_ids, 1, &r), Status::kBadInput);
  const InputData two[2] = {checked[0], checked[0]};
  CHECK_EQ(f.runner.Run(two, 2, &r), Status::kBadInput);
  CHECK_EQ(f.runner.Run(two, 0, &r), Status::kBadInput);
  CHECK_EQ(f.runner.Run(static_cast<const InputData*>(nullptr), 1, &r),
           Status::kBadInput);
  CHECK_EQ(f.runner.Run(checked, 1, nullptr), Status::kBadInput);
  CHECK_EQ(f.s1.invocations, 2);  // none of these ran
  // Still usable afterwards.
  CHECK_EQ(f.runner.Run(checked, 1, &r), Status::kOk);
  CHECK_EQ(r.exit_index, 1);
}

void TestInt32ConfigChecks() {
  {
    // The model takes floats where the config says int32 ids.
    TokenFixture f;
    f.s1.in_desc[0].dtype = DType::kFloat32;
    CHECK_EQ(f.runner.Init(), Status::kTensorMismatch);
  }
  {
    TokenFixture f;
    f.s2.in_desc[0].dtype = DType::kOther;  // carry target
    CHECK_EQ(f.runner.Init(), Status::kTensorMismatch);
  }
  const auto init = [](const TensorConfig& input, const TensorConfig& logits) {
    const TensorConfig inputs[1] = {input};
    SegmentConfig segments[2] = {kTokenSegments[0], kTokenSegments[1]};
    segments[0].inputs = inputs;
    segments[0].logits = logits;
    const ModelConfig model = {segments, 2, 3, 1024, 16};
    TokenFixture f(model);
    return f.runner.Init();
  };
  CHECK_EQ(init(Int32(0, 4, 0, 9), Float(0, 3)), Status::kOk);
  CHECK_EQ(init(Int32(0, 4, 9, 0), Float(0, 3)), Status::kBadConfig);  // min > max
  TensorConfig scaled = Int32(0, 4, 0, 9);
  scaled.scale = 0.5f;  // int32 inputs are never quantized
  CHECK_EQ(init(scaled, Float(0, 3)), Status::kBadConfig);
  TensorConfig wrong_bytes = Int32(0, 4, 0, 9);
  wrong_bytes.bytes = 4;  // one byte per value, as int8
  CHECK_EQ(init(wrong_bytes, Float(0, 3)), Status::kBadConfig);
  // Logits are int8 or float32: ArgMax reads nothing else.
  CHECK_EQ(init(Int32(0, 4, 0, 9), Int32(0, 3)), Status::kBadConfig);
}

// --- Init: the config against itself and against the segments ----------
void TestInitChecksEachTensorsTypeAndQuantization() {
  {
    Int8Fixture f;
    f.s1.in_desc[0].scale = 0.25f;  // input
    CHECK_EQ(f.runner.Init(), Status::kTensorMismatch);
  }
  {
    Int8Fixture f;
    f.s1.in_desc[0].zero_point = 1;
    CHECK_EQ(f.runner.Init(), Status::kTensorMismatch);
  }
  {
    Int8Fixture f;
    f.s1.out_desc[0].dtype = DType::kOther;  // logits
    CHECK_EQ(f.runner.Init(), Status::kTensorMismatch);
  }
  {
    Int8Fixture f;
    f.s2.out_desc[2].scale = 1.0f / 255.0f;  // confidence
    CHECK_EQ(f.runner.Init(), Status::kTensorMismatch);
  }
  {
    Int8Fixture f;
    f.s1.out_desc[2].zero_point = 3;  // carry source
    CHECK_EQ(f.runner.Init(), Status::kTensorMismatch);
  }
  {
    Int8Fixture f;
    f.s3.in_desc[0].bytes = 5;  // carry target
    CHECK_EQ(f.runner.Init(), Status::kTensorMismatch);
  }
  {
    // Within float rounding of the config's 9 digits: the same scale.
    Int8Fixture f;
    f.s1.in_desc[0].scale = 0.5f * (1.0f + 1e-7f);
    CHECK_EQ(f.runner.Init(), Status::kOk);
  }
}

void TestCarryTargetsAreChecked() {
  // Segment 2's input and the carry to it at position 3, which segment 2
  // does not have: refused at Init instead of copied to a null pointer.
  const TensorConfig in2[] = {Int8(3, 4)};
  const CarryConfig carry1[] = {{Int8(2, 4), Int8(3, 4), false}};
  SegmentConfig segments[3] = {kSegments[0], kSegments[1], kSegments[2]};
  segments[0].carry = carry1;
  segments[1].inputs = in2;
  const ModelConfig model = {segments, 3, 3, 1024, 16};
  Int8Fixture f(model);
  CHECK_EQ(f.runner.Init(), Status::kTensorMismatch);
  Result r = {};
  const int8_t x[4] = {0, 0, 0, -1};
  CHECK_EQ(f.runner.Run(x, &r), Status::kBadConfig);  // not initialized
  // A carry to an input that segment 2's config does not list.
  SegmentConfig unlisted[3] = {kSegments[0], kSegments[1], kSegments[2]};
  unlisted[0].carry = carry1;
  const ModelConfig unlisted_model = {unlisted, 3, 3, 1024, 16};
  Int8Fixture g(unlisted_model);
  CHECK_EQ(g.runner.Init(), Status::kBadConfig);
}

void TestConfigChecks() {
  const auto init = [](const SegmentConfig& first) {
    const SegmentConfig segments[3] = {first, kSegments[1], kSegments[2]};
    const ModelConfig model = {segments, 3, 3, 1024, 16};
    Int8Fixture f(model);
    return f.runner.Init();
  };
  // Rank is checked before dims are read (rank 1000 would read past dims).
  TensorConfig inputs[1] = {Int8(0, 4)};
  inputs[0].rank = 1000;
  SegmentConfig s = kSegments[0];
  s.inputs = inputs;
  CHECK_EQ(init(s), Status::kBadConfig);
  inputs[0] = Int8(0, 4);
  inputs[0].rank = -1;
  CHECK_EQ(init(s), Status::kBadConfig);
  inputs[0] = Int8(0, 4);
  inputs[0].dims[1] = -4;
  CHECK_EQ(init(s), Status::kBadConfig);
  inputs[0] = Int8(0, 4);
  inputs[0].zero_point = 300;
  CHECK_EQ(init(s), Status::kBadConfig);
  inputs[0] = Int8(0, 4);
  inputs[0].scale = std::nanf("");
  CHECK_EQ(init(s), Status::kBadConfig);
  inputs[0] = Int8(0, 4);
  CHECK_EQ(init(s), Status::kOk);
  // Quantized thresholds: in [-128, 128], and 128 for a threshold of 1.0.
  s = kSegments[0];
  s.threshold_quantized = 200;
  CHECK_EQ(init(s), Status::kBadConfig);
  s.threshold = 1.0f;
  s.threshold_quantized = 127;
  CHECK_EQ(init(s), Status::kBadConfig);
  s.threshold_quantized = 128;
  CHECK_EQ(init(s), Status::kOk);
  s.threshold = std::nanf("");
  CHECK_EQ(init(s), Status::kBadConfig);
  // Logits must hold num_classes values.
  s = kSegments[0];
  s.logits = Int8(0, 2);
  CHECK_EQ(init(s), Status::kBadConfig);
}

// --- Errors ---------------------------------------------------------------
void TestErrors() {
  {
    Int8Fixture f;
    Result r = {};
    const int8_t x[4] = {};
    CHECK_EQ(f.runner.Run(x, &r), Status::kBadConfig);  // Init not called
  }
  {
    Int8Fixture f;
    EarlyExitRunner runner{kModel, f.segments, f.carry, 8};
    CHECK_EQ(runner.Init(), Status::kCarryBufferTooSmall);
  }
  {
    FakeSegment s1{Segment1, kSegments[0]};
    FakeSegment s2{Fails, kSegments[1]};
    FakeSegment s3{Segment3, kSegments[2]};
    Segment* segments[3] = {&s1, &s2, &s3};
    alignas(16) uint8_t carry[16];
    EarlyExitRunner runner{kModel, segments, carry, sizeof(carry)};
    CHECK_EQ(runner.Init(), Status::kOk);
    Result r = {};
    const int8_t x[4] = {0, 0, 0, -1};
    CHECK_EQ(runner.Run(x, &r), Status::kInvokeFailed);
    CHECK_EQ(s3.invocations, 0);
  }
  {
    const ModelConfig empty = {kSegments, 0, 3, 1024, 16};
    Int8Fixture f;
    EarlyExitRunner runner{empty, f.segments, f.carry, sizeof(f.carry)};
    CHECK_EQ(runner.Init(), Status::kBadConfig);
    const float t[1] = {0.5f};
    CHECK_EQ(runner.SetThresholds(t, -1), Status::kBadConfig);
  }
  {
    Int8Fixture f;
    Segment* missing[3] = {&f.s1, nullptr, &f.s3};
    EarlyExitRunner runner{kModel, missing, f.carry, sizeof(f.carry)};
    CHECK_EQ(runner.Init(), Status::kBadConfig);
  }
  for (int s = 0; s <= static_cast<int>(Status::kBadPatience); ++s) {
    CHECK(std::strcmp(earlyexit::StatusString(static_cast<Status>(s)),
                      "unknown status") != 0);
  }
}

}  // namespace

int main() {
  TestExitsAtFirstConfidentSegment();
  TestCarryReachesLaterSegments();
  TestThresholdOfOneSendsEverySampleToTheFinalExit();
  TestSetThresholdsBeforeInitIsKept();
  TestQuantizeThresholdIsTheFloat32Scan();
  TestQuantizeRoundsHalfAwayFromZero();
  TestQuantizeRefusesNonFiniteValues();
  TestRequantizedAndAlignedCarries();
  TestSingleInputRunOnATwoInputModelIsRefused();
  TestFloatBundle();
  TestPatienceNeedsAgreeingExits();
  TestBadPatienceIsRefused();
  TestInt32TokenInputs();
  TestInt32ConfigChecks();
  TestInitChecksEachTensorsTypeAndQuantization();
  TestCarryTargetsAreChecked();
  TestConfigChecks();
  TestErrors();
  return earlyexit_test::Summary("runner_test");
}
