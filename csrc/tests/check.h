// A minimal test harness for the kernel cores: TEST cases registered at
// static-initialisation time, CHECK macros that report and count failures.
#pragma once

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace lowbit_test {

struct Case {
  const char* name;
  std::function<void()> body;
};

inline std::vector<Case>& cases() {
  static std::vector<Case> all;
  return all;
}

inline int& failures() {
  static int count = 0;
  return count;
}

struct Register {
  Register(const char* name, std::function<void()> body) { cases().push_back({name, body}); }
};

inline int run_all() {
  for (const Case& c : cases()) {
    const int before = failures();
    c.body();
    std::printf("%s %s\n", failures() == before ? "ok  " : "FAIL", c.name);
  }
  std::printf("%d case(s), %d failed check(s)\n", static_cast<int>(cases().size()), failures());
  return failures() == 0 ? 0 : 1;
}

}  // namespace lowbit_test

#define LOWBIT_CONCAT2(a, b) a##b
#define LOWBIT_CONCAT(a, b) LOWBIT_CONCAT2(a, b)
#define TEST(name)                                                              \
  static void name();                                                           \
  static lowbit_test::Register LOWBIT_CONCAT(register_, name)(#name, name);     \
  static void name()

// Reports a failed condition with its location and an optional printf message;
// stops the current case after the first few failures to keep logs short.
#define CHECK(cond, ...)                                                        \
  do {                                                                          \
    if (!(cond)) {                                                              \
      ++lowbit_test::failures();                                                \
      std::printf("  %s:%d: CHECK(%s) failed ", __FILE__, __LINE__, #cond);     \
      std::printf(" " __VA_ARGS__);                                              \
      std::printf("\n");                                                        \
      if (lowbit_test::failures() > 20) return;                                 \
    }                                                                           \
  } while (0)

#define TEST_MAIN() \
  int main() { return lowbit_test::run_all(); }
