#include <teleport/data/idx.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <limits>
#include <memory>
#include <vector>

#ifdef TELEPORT_HAVE_ZLIB
#include <zlib.h>
#endif

namespace teleport::data {
namespace {

bool exists(const std::string& path) { return std::ifstream(path).good(); }

// The whole file, decompressed when gzipped.
std::vector<uint8_t> read_bytes(const std::string& path) {
  TORCH_CHECK(exists(path), "read_idx: cannot open ", path, ": no such file");
  std::vector<uint8_t> bytes;
#ifdef TELEPORT_HAVE_ZLIB
  // gzread passes plain files through unchanged.
  std::unique_ptr<gzFile_s, int (*)(gzFile)> f(gzopen(path.c_str(), "rb"), gzclose);
  TORCH_CHECK(f != nullptr, "read_idx: cannot open ", path);
  uint8_t buffer[1 << 16];
  int n;
  while ((n = gzread(f.get(), buffer, sizeof(buffer))) > 0) bytes.insert(bytes.end(), buffer, buffer + n);
  int err = 0;
  const char* msg = gzerror(f.get(), &err);
  TORCH_CHECK(n == 0 && (err == Z_OK || err == Z_STREAM_END), "read_idx: ", path,
              " is corrupt: ", msg);
#else
  std::ifstream f(path, std::ios::binary);
  bytes.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  TORCH_CHECK(bytes.size() < 2 || !(bytes[0] == 0x1f && bytes[1] == 0x8b), "read_idx: ", path,
              " is gzipped, and this build of teleport has no zlib: decompress it first");
#endif
  return bytes;
}

uint32_t big_endian(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

// `<dir>/<name>`, or its `.gz` when only that exists.
std::string locate(const std::string& dir, const std::string& name) {
  const std::string plain = dir + "/" + name;
  if (exists(plain) || !exists(plain + ".gz")) return plain;
  return plain + ".gz";
}

}  // namespace

bool idx_gzip_supported() {
#ifdef TELEPORT_HAVE_ZLIB
  return true;
#else
  return false;
#endif
}

at::Tensor read_idx(const std::string& path) {
  const std::vector<uint8_t> bytes = read_bytes(path);
  TORCH_CHECK(bytes.size() >= 4 && bytes[0] == 0 && bytes[1] == 0, "read_idx: ", path,
              " is not an IDX file (expected a magic number 0x0000TTDD)");
  TORCH_CHECK(bytes[2] == 0x08, "read_idx: ", path,
              " holds another element type than unsigned bytes (type code ", int(bytes[2]), ")");
  const int dims = bytes[3];
  TORCH_CHECK(dims >= 1 && dims <= 4, "read_idx: ", path, ": expected 1 to 4 dimensions, got ",
              dims);
  const size_t header = 4 + 4 * static_cast<size_t>(dims);
  TORCH_CHECK(bytes.size() >= header, "read_idx: ", path, " is truncated: its header needs ",
              header, " bytes, the file has ", bytes.size());
  std::vector<int64_t> shape;
  for (int d = 0; d < dims; ++d) shape.push_back(big_endian(&bytes[4 + 4 * d]));
  // The element count, refused where a crafted header's product would wrap
  // around (and so could match the file's size).
  size_t count = 1;
  for (const int64_t n : shape) count = n == 0 ? 0 : count;
  for (const int64_t n : shape) {
    if (count == 0) break;
    TORCH_CHECK(count <= std::numeric_limits<size_t>::max() / static_cast<size_t>(n), "read_idx: ",
                path, " is truncated: its header promises ", c10::IntArrayRef(shape),
                " bytes of data, more than any file holds");
    count *= static_cast<size_t>(n);
  }
  TORCH_CHECK(bytes.size() - header == count, "read_idx: ", path, " is ",
              bytes.size() - header < count ? "truncated" : "too long", ": its header promises ",
              count, " bytes of data, the file has ", bytes.size() - header);
  at::Tensor out = at::empty(shape, at::kByte);
  std::copy(bytes.begin() + header, bytes.end(), out.data_ptr<uint8_t>());
  return out;
}

ImageSet read_image_set(const std::string& dir, const std::string& prefix, double mean,
                        double std) {
  const at::Tensor images = read_idx(locate(dir, prefix + "-images-idx3-ubyte"));
  const at::Tensor labels = read_idx(locate(dir, prefix + "-labels-idx1-ubyte"));
  TORCH_CHECK(images.dim() == 3, "read_image_set: expected images of 3 dimensions in ", dir,
              ", got ", images.dim());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == images.size(0), "read_image_set: ", dir,
              " has ", images.size(0), " images but ", labels.numel(), " labels");
  ImageSet set;
  set.images = (images.reshape({images.size(0), -1}).to(at::kFloat) / 255.0 - mean) / std;
  set.labels = labels.to(at::kLong);
  return set;
}

}  // namespace teleport::data
