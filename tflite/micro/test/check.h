// Minimal checks for the host test programs (no test framework on the
// embedded toolchains this code also builds with).

#ifndef KERAS_EARLYEXIT_TFLITE_MICRO_TEST_CHECK_H_
#define KERAS_EARLYEXIT_TFLITE_MICRO_TEST_CHECK_H_

#include <cstdio>

namespace earlyexit_test {

inline int failures = 0;
inline int checks = 0;

// Prints the tally; the process exit status.
inline int Summary(const char* program) {
  if (failures != 0) {
    std::printf("%s: %d of %d checks FAILED\n", program, failures, checks);
    return 1;
  }
  std::printf("%s: all %d checks passed\n", program, checks);
  return 0;
}

}  // namespace earlyexit_test

#define CHECK(cond)                                                        \
  do {                                                                     \
    ++earlyexit_test::checks;                                              \
    if (!(cond)) {                                                         \
      ++earlyexit_test::failures;                                          \
      std::printf("%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                      \
  } while (0)

#define CHECK_EQ(a, b) CHECK((a) == (b))

#endif  // KERAS_EARLYEXIT_TFLITE_MICRO_TEST_CHECK_H_
