#include <common/idx.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
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

// A file read in order, decompressed when gzipped (gzread passes plain files
// through unchanged); read() returns how many bytes it gave, fewer at the end.
class Reader {
 public:
  explicit Reader(const std::string& path) : path_(path) {
    TORCH_CHECK(exists(path), "read_idx: cannot open ", path, ": no such file");
#ifdef TELEPORT_HAVE_ZLIB
    file_ = gzopen(path.c_str(), "rb");
    TORCH_CHECK(file_ != nullptr, "read_idx: cannot open ", path);
#else
    file_.open(path, std::ios::binary);
#endif
  }
  ~Reader() {
#ifdef TELEPORT_HAVE_ZLIB
    if (file_ != nullptr) gzclose(file_);
#endif
  }
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;

  size_t read(uint8_t* into, size_t n) {
    size_t done = 0;
    while (done < n) {
#ifdef TELEPORT_HAVE_ZLIB
      const unsigned chunk = static_cast<unsigned>(std::min<size_t>(n - done, 1u << 30));
      const int got = gzread(file_, into + done, chunk);
      int err = 0;
      const char* msg = gzerror(file_, &err);
      TORCH_CHECK(got >= 0 && (err == Z_OK || err == Z_STREAM_END), "read_idx: ", path_,
                  " is corrupt: ", msg);
#else
      file_.read(reinterpret_cast<char*>(into + done), static_cast<std::streamsize>(n - done));
      const std::streamsize got = file_.gcount();
      if (done == 0 && n >= 2 && got >= 2) {
        TORCH_CHECK(!(into[0] == 0x1f && into[1] == 0x8b), "read_idx: ", path_,
                    " is gzipped, and this build of teleport has no zlib: decompress it first");
      }
#endif
      if (got == 0) break;
      done += static_cast<size_t>(got);
    }
    return done;
  }

  // The bytes left after what was read, counted.
  size_t rest() {
    uint8_t buffer[1 << 16];
    size_t n = 0;
    for (size_t got; (got = read(buffer, sizeof(buffer))) > 0;) n += got;
    return n;
  }

 private:
  std::string path_;
#ifdef TELEPORT_HAVE_ZLIB
  gzFile file_ = nullptr;
#else
  std::ifstream file_;
#endif
};

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

// Read in place: the header first, then the data straight into the tensor
// it returns (no copy of the file in between).
at::Tensor read_idx(const std::string& path) {
  Reader in(path);
  uint8_t head[4 + 4 * 4] = {};
  const size_t got_magic = in.read(head, 4);
  TORCH_CHECK(got_magic == 4 && head[0] == 0 && head[1] == 0, "read_idx: ", path,
              " is not an IDX file (expected a magic number 0x0000TTDD)");
  TORCH_CHECK(head[2] == 0x08, "read_idx: ", path,
              " holds another element type than unsigned bytes (type code ", int(head[2]), ")");
  const int dims = head[3];
  TORCH_CHECK(dims >= 1 && dims <= 4, "read_idx: ", path, ": expected 1 to 4 dimensions, got ",
              dims);
  const size_t header = 4 + 4 * static_cast<size_t>(dims);
  const size_t got_sizes = in.read(head + 4, header - 4);
  TORCH_CHECK(got_sizes == header - 4, "read_idx: ", path, " is truncated: its header needs ",
              header, " bytes, the file has ", 4 + got_sizes);
  std::vector<int64_t> shape;
  for (int d = 0; d < dims; ++d) shape.push_back(big_endian(&head[4 + 4 * d]));
  // The element count, refused where a crafted header's product would wrap
  // around (and before anything of that size is allocated).
  size_t count = 1;
  for (const int64_t n : shape) count = n == 0 ? 0 : count;
  for (const int64_t n : shape) {
    if (count == 0) break;
    TORCH_CHECK(count <= std::numeric_limits<size_t>::max() / static_cast<size_t>(n),
                "read_idx: ", path, " is truncated: its header promises ", c10::IntArrayRef(shape),
                " bytes of data, more than any file holds");
    count *= static_cast<size_t>(n);
  }
  // Read a block at a time into a tensor that grows only as the data comes:
  // a header that promises more than the file holds fails without the
  // promised allocation.
  at::Tensor out = at::empty({static_cast<int64_t>(std::min<size_t>(count, 1 << 20))}, at::kByte);
  size_t have = 0;
  while (have < count) {
    if (static_cast<size_t>(out.numel()) == have) {
      const size_t grown = std::min(count, 4 * have);
      at::Tensor bigger = at::empty({static_cast<int64_t>(grown)}, at::kByte);
      bigger.narrow(0, 0, static_cast<int64_t>(have))
          .copy_(out.narrow(0, 0, static_cast<int64_t>(have)));
      out = bigger;
    }
    const size_t got =
        in.read(out.data_ptr<uint8_t>() + have, static_cast<size_t>(out.numel()) - have);
    if (got == 0) break;
    have += got;
  }
  const size_t extra = have == count ? in.rest() : 0;
  TORCH_CHECK(have == count && extra == 0, "read_idx: ", path, " is ",
              have < count ? "truncated" : "too long", ": its header promises ", count,
              " bytes of data, the file has ", have + extra);
  return out.narrow(0, 0, static_cast<int64_t>(count)).view(shape);
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
  // Normalised in place: one float copy of the images, no temporaries.
  set.images = images.reshape({images.size(0), -1}).to(at::kFloat);
  set.images.div_(255.0).sub_(mean).div_(std);
  set.labels = labels.to(at::kLong);
  return set;
}

}  // namespace teleport::data
