// The packed layout: round trips, field positions, and the size of a row.
#include <random>
#include <vector>

#include "check.h"
#include "lowbit/cpu.h"
#include "lowbit/format.h"

using namespace lowbit;

TEST(rows_round_trip_for_every_width) {
  std::mt19937 rng(7);
  for (int bits : {2, 3, 4}) {
    for (int64_t k : {32, 64, 96, 576, 1536}) {
      std::vector<uint8_t> codes(k), back(k, 0xff);
      for (auto& c : codes) c = uint8_t(rng() % (1u << bits));
      std::vector<uint32_t> row(words_per_row(k, bits), 0xdeadbeefu);
      pack_row(codes.data(), k, bits, row.data());
      unpack_row(row.data(), k, bits, back.data());
      CHECK(back == codes, "bits=%d k=%ld", bits, long(k));
      for (int64_t i = 0; i < k; ++i) CHECK(get_code(row.data(), k, bits, i) == codes[i]);
    }
  }
}

TEST(fields_sit_where_the_format_says) {
  std::vector<uint8_t> codes(64, 0);
  codes[33] = 0b111;
  std::vector<uint32_t> row(6);
  pack_row(codes.data(), 64, 3, row.data());
  // 2-bit plane: code 33 is field 1 of word 2; 1-bit plane (offset K/16 = 4): bit 1 of word 5.
  CHECK(row[2] == (3u << 2) && row[0] == 0 && row[1] == 0 && row[3] == 0);
  CHECK(row[4] == 0 && row[5] == (1u << 1));
  CHECK(words_per_row(4096, 2) == 256 && words_per_row(4096, 3) == 384 && words_per_row(4096, 4) == 512);
}

TEST(pack_and_unpack_cover_every_row) {
  const int64_t n = 13, k = 96;
  std::mt19937 rng(3);
  for (int bits : {2, 3, 4}) {
    std::vector<uint8_t> codes(n * k), back(n * k, 0xff);
    for (auto& c : codes) c = uint8_t(rng() % (1u << bits));
    std::vector<uint32_t> packed(n * words_per_row(k, bits), 0xdeadbeefu);
    cpu::pack(codes.data(), n, k, bits, packed.data(), cpu::Serial());
    cpu::unpack(packed.data(), n, k, bits, back.data(), cpu::Serial());
    CHECK(back == codes, "bits=%d", bits);
  }
}

TEST_MAIN()
