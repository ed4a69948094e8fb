// The IDX reader, on small files the test writes itself.
#include <common/idx.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

namespace teleport::testing {
namespace {

std::string temp_path(const std::string& name) {
  return ::testing::TempDir() + "teleport_idx_" + name;
}

// An IDX file of unsigned bytes: magic 0x0000 08 dims, big-endian sizes, data.
void write_idx(const std::string& path, const std::vector<uint32_t>& shape,
               const std::vector<uint8_t>& data, std::ptrdiff_t cut = 0) {
  std::vector<uint8_t> bytes = {0, 0, 0x08, static_cast<uint8_t>(shape.size())};
  for (uint32_t s : shape) {
    for (int k = 3; k >= 0; --k) bytes.push_back(static_cast<uint8_t>(s >> (8 * k)));
  }
  bytes.insert(bytes.end(), data.begin(), data.end());
  bytes.resize(bytes.size() - cut);
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

std::string error_of_read(const std::string& path) {
  try {
    data::read_idx(path);
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

TEST(IdxTest, ReadsShapeAndBytes) {
  const auto path = temp_path("ok");
  write_idx(path, {2, 3}, {1, 2, 3, 4, 5, 255});
  const at::Tensor t = data::read_idx(path);
  EXPECT_EQ(t.sizes(), at::IntArrayRef({2, 3}));
  EXPECT_EQ(t.scalar_type(), at::kByte);
  EXPECT_EQ(t[1][2].item<int>(), 255);
  EXPECT_EQ(t.sum().item<int64_t>(), 270);
}

TEST(IdxTest, RejectsBadMagicTypeAndTruncation) {
  const auto path = temp_path("bad");
  std::ofstream(path, std::ios::binary) << "PK\x03\x04 not an idx file";
  EXPECT_NE(error_of_read(path).find("is not an IDX file"), std::string::npos);
  write_idx(path, {4}, {1, 2, 3, 4}, /*cut=*/1);
  EXPECT_NE(
      error_of_read(path).find("is truncated: its header promises 4 bytes of data, the file has 3"),
      std::string::npos);
  write_idx(path, {3}, {1, 2, 3, 4});
  EXPECT_NE(error_of_read(path).find("is too long"), std::string::npos);
  // 2^16 · 2^16 · 2^16 · 2^16 wraps to 0 in 64 bits: an empty file matched it.
  write_idx(path, {65536, 65536, 65536, 65536}, {});
  EXPECT_NE(error_of_read(path).find("more than any file holds"), std::string::npos)
      << error_of_read(path);
  std::vector<uint8_t> wrong_type = {0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0};
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(wrong_type.data()), 12);
  EXPECT_NE(error_of_read(path).find("another element type"), std::string::npos);
  EXPECT_NE(error_of_read(temp_path("missing")).find("no such file"), std::string::npos);
}

TEST(IdxTest, ImageSetChecksThatImagesAndLabelsAgree) {
  const std::string dir = ::testing::TempDir();
  write_idx(dir + "/x-images-idx3-ubyte", {3, 2, 2}, std::vector<uint8_t>(12, 51));
  write_idx(dir + "/x-labels-idx1-ubyte", {3}, {0, 1, 2});
  const auto set = data::read_image_set(dir, "x", 0.1, 0.5);
  EXPECT_EQ(set.images.sizes(), at::IntArrayRef({3, 4}));
  EXPECT_NEAR(set.images[0][0].item<double>(), (51 / 255.0 - 0.1) / 0.5, 1e-6);
  EXPECT_EQ(set.labels.scalar_type(), at::kLong);
  write_idx(dir + "/x-labels-idx1-ubyte", {2}, {0, 1});
  try {
    data::read_image_set(dir, "x", 0.1, 0.5);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("has 3 images but 2 labels"),
              std::string::npos);
  }
}

}  // namespace
}  // namespace teleport::testing
