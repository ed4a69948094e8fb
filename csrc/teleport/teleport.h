#pragma once

/// teleport: symmetry teleportation for LibTorch training loops.
/// Zhao, Dehmamy, Walters, Yu, "Symmetry Teleportation for Accelerated
/// Optimization", NeurIPS 2022.

#include <teleport/ascent.h>
#include <teleport/attention.h>
#include <teleport/batch_loss.h>
#include <teleport/discover.h>
#include <teleport/layers.h>
#include <teleport/optimizer.h>
#include <teleport/options.h>
#include <teleport/report.h>
#include <teleport/so2.h>
#include <teleport/symmetry.h>
