// AMX tile set-up shared by the native kernels (cpu_kernels.cc, cpu_unembed.cc), where the build
// targets AMX (-march=native on a CPU with AMX-TILE and AMX-BF16).
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace gptoss {

struct TileConfig {
  uint8_t palette, start, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Asks Linux for the tile state, once per process (arch_prctl).
inline bool AmxPermitted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return permitted;
}

inline void AmxConfigure() {  // eight tiles of 16 rows x 64 bytes (each call: other code may use the tiles)
  alignas(64) TileConfig config = {};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
}

}  // namespace gptoss
#endif
