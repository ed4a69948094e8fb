#pragma once
// The examples' data reader (not part of the library).

#include <ATen/Tensor.h>

#include <string>

namespace teleport::data {

/// Reads an IDX file (the format of MNIST and Fashion-MNIST): plain, or
/// gzipped when built with zlib. Returns a uint8 tensor of the
/// shape the header gives. Throws a c10::Error that names the file and what
/// is wrong with it: missing, not IDX, not unsigned bytes, or truncated.
at::Tensor read_idx(const std::string& path);

/// Whether gzipped files can be read (built with zlib).
bool idx_gzip_supported();

/// An image-classification set: images as float (N, rows*cols), normalised
/// with the given mean and std, labels as int64 (N).
struct ImageSet {
  at::Tensor images;
  at::Tensor labels;
};

/// Reads `<dir>/<prefix>-images-idx3-ubyte` and `<dir>/<prefix>-labels-idx1-ubyte`
/// (or their `.gz`), prefix "train" or "t10k", and checks that they agree.
ImageSet read_image_set(const std::string& dir, const std::string& prefix, double mean, double std);

}  // namespace teleport::data
