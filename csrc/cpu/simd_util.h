// Small helpers of the vector kernels: an aligned scratch buffer, a parallel
// loop over a range, integer min and ceiling division. Included inside the
// namespace of each compile target (simd_linear.h, avx512_bf16.cpp), so that
// no inline function exists for two targets under one name; hence no include
// guard. Needs <cstdlib>, <new> and lowbit/cpu.h included before the target
// switch; instantiates no standard-library template.

// An aligned buffer (plain malloc: no standard template is instantiated under
// the includer's target).
template <class T>
class Scratch {
 public:
  explicit Scratch(int64_t count) {
    const size_t bytes = (static_cast<size_t>(count > 0 ? count : 1) * sizeof(T) + 63) / 64 * 64;
    data_ = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (data_ == nullptr) throw std::bad_alloc();
  }
  ~Scratch() { std::free(data_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return data_; }

 private:
  T* data_;
};

template <class Fn>
void for_range(const Parallel& par, int64_t n, int64_t grain, Fn&& fn) {
  RangeFn range{&fn, [](void* ctx, int64_t b, int64_t e) { (*static_cast<Fn*>(ctx))(b, e); }};
  par.for_range(n, grain, range);
}

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
