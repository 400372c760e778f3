// Host test of EarlyExitRunner: segments are small arithmetic functions with
// known results (not TFLite Micro), so routing, carry hand-off,
// requantization and thresholds are checked exactly. Build: `make test`.

#include <cmath>
#include <cstdio>
#include <cstring>

#include "earlyexit_runner.h"

namespace {

int g_failures = 0;
int g_checks = 0;

#define CHECK(cond)                                                  \
  do {                                                               \
    ++g_checks;                                                      \
    if (!(cond)) {                                                   \
      ++g_failures;                                                  \
      std::printf("%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                \
  } while (0)

#define CHECK_EQ(a, b) CHECK((a) == (b))

using earlyexit::CarryConfig;
using earlyexit::DType;
using earlyexit::EarlyExitRunner;
using earlyexit::ModelConfig;
using earlyexit::Result;
using earlyexit::Segment;
using earlyexit::SegmentConfig;
using earlyexit::Status;
using earlyexit::TensorConfig;

constexpr int kMaxTensors = 4;
constexpr size_t kBufferBytes = 64;

// A segment whose Invoke applies `fn` to plain byte buffers.
class FakeSegment : public Segment {
 public:
  using Fn = bool (*)(FakeSegment&);

  FakeSegment(Fn fn, const size_t* input_sizes, int num_inputs,
              const size_t* output_sizes, int num_outputs)
      : fn_(fn), num_inputs_(num_inputs), num_outputs_(num_outputs) {
    for (int i = 0; i < num_inputs; ++i) input_sizes_[i] = input_sizes[i];
    for (int i = 0; i < num_outputs; ++i) output_sizes_[i] = output_sizes[i];
  }
  void* input(int p) override { return p < num_inputs_ ? in[p] : nullptr; }
  size_t input_bytes(int p) override { return p < num_inputs_ ? input_sizes_[p] : 0; }
  const void* output(int p) override { return p < num_outputs_ ? out[p] : nullptr; }
  size_t output_bytes(int p) override {
    return p < num_outputs_ ? output_sizes_[p] : 0;
  }
  bool Invoke() override {
    ++invocations;
    return fn_(*this);
  }
  int8_t* in8(int p) { return reinterpret_cast<int8_t*>(in[p]); }
  int8_t* out8(int p) { return reinterpret_cast<int8_t*>(out[p]); }
  float* inf(int p) { return reinterpret_cast<float*>(in[p]); }
  float* outf(int p) { return reinterpret_cast<float*>(out[p]); }

  alignas(16) uint8_t in[kMaxTensors][kBufferBytes] = {};
  alignas(16) uint8_t out[kMaxTensors][kBufferBytes] = {};
  int invocations = 0;

 private:
  Fn fn_;
  int num_inputs_;
  int num_outputs_;
  size_t input_sizes_[kMaxTensors] = {};
  size_t output_sizes_[kMaxTensors] = {};
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
constexpr ModelConfig kModel = {kSegments, 3, 3, 0, 16};

constexpr size_t kIn4[] = {4};
constexpr size_t kOut1[] = {3, 1, 4};
constexpr size_t kOut2[] = {4, 3, 1};
constexpr size_t kOut3[] = {1, 3};

struct Int8Fixture {
  FakeSegment s1{Segment1, kIn4, 1, kOut1, 3};
  FakeSegment s2{Segment2, kIn4, 1, kOut2, 3};
  FakeSegment s3{Segment3, kIn4, 1, kOut3, 2};
  Segment* segments[3] = {&s1, &s2, &s3};
  alignas(16) uint8_t carry[16] = {};
  EarlyExitRunner runner{kModel, segments, carry, sizeof(carry)};
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
  const float never[2] = {1.0f, 1.0f};  // (127 + 128) / 256 < 1: quantized 128
  CHECK_EQ(f.runner.SetThresholds(never, 2), Status::kOk);
  const int8_t x[4] = {1, 2, 3, 127};
  CHECK_EQ(RunOrFail(f.runner, x).exit_index, 2);
  const float zero[2] = {0.0f, 0.0f};  // every int8 confidence reaches 0
  CHECK_EQ(f.runner.SetThresholds(zero, 2), Status::kOk);
  const int8_t low[4] = {1, 2, 3, -128};
  CHECK_EQ(RunOrFail(f.runner, low).exit_index, 0);
  const float bad[2] = {0.5f, 1.5f};
  CHECK_EQ(f.runner.SetThresholds(bad, 2), Status::kBadThreshold);
  CHECK_EQ(f.runner.SetThresholds(zero, 1), Status::kBadThreshold);
}

void TestQuantizeThresholdMatchesPython() {
  // Values from keras_earlyexit.export.manifest.quantize_threshold.
  CHECK_EQ(earlyexit::QuantizeThreshold(0.5f, 1.0f / 256, -128), 0);
  CHECK_EQ(earlyexit::QuantizeThreshold(0.3f, 1.0f / 255, -128), -51);
  CHECK_EQ(earlyexit::QuantizeThreshold(1.0f, 1.0f / 256, -128), 128);
  CHECK_EQ(earlyexit::QuantizeThreshold(0.9f, 0.0005154499085620046f, -128), 128);
  CHECK_EQ(earlyexit::QuantizeThreshold(0.0f, 1.0f / 256, -128), -128);
}

void TestQuantizeRoundsHalfAwayFromZero() {
  const float x[6] = {0.25f, -0.25f, 0.75f, 100.0f, -100.0f, 0.0f};
  int8_t q[6];
  earlyexit::Quantize(x, q, 6, 0.5f, 3);
  const int8_t expected[6] = {4, 2, 5, 127, -128, 3};  // 0.5 -> 1, -0.5 -> -1
  CHECK(std::memcmp(q, expected, 6) == 0);
}

// --- Requantized carry, and two carry tensors ----------------------------
//   segment 1: outputs a = x (pos 0, 6 bytes, scale 0.5), b = x[0..4] (pos 3,
//   5 bytes, scale 1.0), logits (pos 1), conf (pos 2) = x[5].
//   segment 2 takes b at input 0 (scale 1.0, requantized from... none) and
//   a at input 1 with scale 0.25, zero point -10: requantized.
bool TwoCarrySegment1(FakeSegment& s) {
  std::memcpy(s.out[0], s.in[0], 6);
  std::memcpy(s.out[3], s.in[0], 5);
  std::memcpy(s.out[1], s.in[0], 3);
  s.out8(2)[0] = s.in8(0)[5];
  return true;
}
bool TwoCarrySegment2(FakeSegment& s) {
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
constexpr ModelConfig kTwoModel = {kTwoSegments, 2, 3, 0, 32};

void TestRequantizedAndAlignedCarries() {
  const size_t in1[] = {6}, out1[] = {6, 3, 1, 5}, in2[] = {5, 6}, out2[] = {1, 3};
  FakeSegment s1{TwoCarrySegment1, in1, 1, out1, 4};
  FakeSegment s2{TwoCarrySegment2, in2, 2, out2, 2};
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
constexpr ModelConfig kFloatModel = {kFloatSegments, 2, 2, 0, 16};

void TestFloatBundle() {
  const size_t in[] = {8}, out1[] = {4, 8, 8}, out2[] = {4, 8};
  FakeSegment s1{FloatSegment1, in, 1, out1, 3};
  FakeSegment s2{FloatSegment2, in, 1, out2, 2};
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
    // The model data does not match the config: an input of 5 bytes.
    const size_t wrong[] = {5};
    FakeSegment s1{Segment1, wrong, 1, kOut1, 3};
    FakeSegment s2{Segment2, kIn4, 1, kOut2, 3};
    FakeSegment s3{Segment3, kIn4, 1, kOut3, 2};
    Segment* segments[3] = {&s1, &s2, &s3};
    alignas(16) uint8_t carry[16];
    EarlyExitRunner runner{kModel, segments, carry, sizeof(carry)};
    CHECK_EQ(runner.Init(), Status::kTensorMismatch);
  }
  {
    Int8Fixture f;
    EarlyExitRunner runner{kModel, f.segments, f.carry, 8};
    CHECK_EQ(runner.Init(), Status::kCarryBufferTooSmall);
  }
  {
    FakeSegment s1{Segment1, kIn4, 1, kOut1, 3};
    FakeSegment s2{Fails, kIn4, 1, kOut2, 3};
    FakeSegment s3{Segment3, kIn4, 1, kOut3, 2};
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
    const ModelConfig empty = {kSegments, 0, 3, 0, 16};
    Int8Fixture f;
    EarlyExitRunner runner{empty, f.segments, f.carry, sizeof(f.carry)};
    CHECK_EQ(runner.Init(), Status::kBadConfig);
  }
  CHECK(std::strlen(earlyexit::StatusString(Status::kTensorMismatch)) > 10);
}

}  // namespace

int main() {
  TestExitsAtFirstConfidentSegment();
  TestCarryReachesLaterSegments();
  TestThresholdOfOneSendsEverySampleToTheFinalExit();
  TestQuantizeThresholdMatchesPython();
  TestQuantizeRoundsHalfAwayFromZero();
  TestRequantizedAndAlignedCarries();
  TestFloatBundle();
  TestErrors();
  if (g_failures != 0) {
    std::printf("runner_test: %d of %d checks FAILED\n", g_failures, g_checks);
    return 1;
  }
  std::printf("runner_test: all %d checks passed\n", g_checks);
  return 0;
}
