//! `efficientnet-lite0` on candle: the ImageNet-pretrained EfficientNet-Lite0
//! as DESIGN.md specifies, returning the 1280-d global-average-pooled vector
//! (and, for tests, the 1000 ImageNet logits of the classifier head).
//!
//! Built for the CPU:
//! - activations are NHWC, so every 1x1 convolution is one matmul
//!   `(N*H*W, C) x (C, O)` with a large M;
//! - BatchNorm is folded into the convolution weights and bias at load;
//! - depthwise convolutions run in a kernel of our own ([`Depthwise`]):
//!   candle's grouped convolution runs group by group, which for a
//!   depthwise layer means one tiny convolution per channel. Ours walks
//!   output rows in parallel (rayon) and vectorises over the contiguous
//!   channels, with bias and ReLU6 fused;
//! - TensorFlow "same" padding (extra pixel at the end on stride-2 convs).

use std::{collections::HashMap, path::Path};

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

/// The input side EfficientNet-Lite0 was trained at (its catalogue entry's
/// `image.crop`); the network itself takes any side of at least 32.
pub const INPUT_SIZE: usize = 224;
pub const DIM: usize = 1280;
const BN_EPS: f64 = 1e-3;

/// (repeats, kernel, stride, expand ratio, in channels, out channels).
const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

#[derive(Debug, thiserror::Error)]
pub enum ImageModelError {
    #[error("reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("weight {name}: {reason}")]
    Weight { name: String, reason: String },
    #[error("model: {0}")]
    Candle(#[from] candle_core::Error),
}

/// TensorFlow "same" padding for one axis: (before, after).
fn same_pad(size: usize, k: usize, stride: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    let total = ((out - 1) * stride + k).saturating_sub(size);
    (total / 2, total - total / 2)
}

/// A 1x1 convolution with folded BatchNorm: `(C, O)` weights and bias.
struct Pointwise {
    w: Tensor,
    b: Tensor,
}

impl Pointwise {
    /// `x`: (M, C) -> (M, O).
    fn forward(&self, x: &Tensor, relu6: bool) -> candle_core::Result<Tensor> {
        let y = x.matmul(&self.w)?.broadcast_add(&self.b)?;
        if relu6 { y.clamp(0f32, 6f32) } else { Ok(y) }
    }
}

/// Depthwise k x k convolution + folded BatchNorm + ReLU6 over NHWC.
#[derive(Clone)]
struct Depthwise {
    k: usize,
    stride: usize,
    channels: usize,
    /// `[ky][kx][c]`.
    w: Vec<f32>,
    b: Vec<f32>,
}

impl CustomOp1 for Depthwise {
    fn name(&self) -> &'static str {
        "depthwise-nhwc-relu6"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("depthwise: f32 input expected") };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("depthwise: contiguous input expected")
        };
        let (n, h, w, c) = layout.shape().dims4()?;
        if c != self.channels {
            candle_core::bail!("depthwise: {c} channels, weights for {}", self.channels);
        }
        let x = &data[start..end];
        let (k, s) = (self.k, self.stride);
        let (oh, ow) = (h.div_ceil(s), w.div_ceil(s));
        let (pt, pl) = (same_pad(h, k, s).0, same_pad(w, k, s).0);
        let mut out = vec![0f32; n * oh * ow * c];
        out.par_chunks_mut(ow * c).enumerate().for_each(|(row, orow)| {
            let (img, oy) = (row / oh, row % oh);
            for ox in 0..ow {
                let acc = &mut orow[ox * c..(ox + 1) * c];
                acc.copy_from_slice(&self.b);
                for ky in 0..k {
                    let Some(iy) = (oy * s + ky).checked_sub(pt).filter(|&y| y < h) else { continue };
                    for kx in 0..k {
                        let Some(ix) = (ox * s + kx).checked_sub(pl).filter(|&x| x < w) else { continue };
                        let base = ((img * h + iy) * w + ix) * c;
                        let input = &x[base..base + c];
                        let wk = &self.w[(ky * k + kx) * c..(ky * k + kx + 1) * c];
                        for ((a, i), wv) in acc.iter_mut().zip(input).zip(wk) {
                            *a += i * wv;
                        }
                    }
                }
                for a in acc.iter_mut() {
                    *a = a.clamp(0.0, 6.0);
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, oh, ow, c))))
    }
}

/// The stem: k x k, stride 2, over the 3 input channels, as im2col + matmul.
struct Stem {
    k: usize,
    stride: usize,
    /// `(k*k*3, 32)`, rows ordered (ky, kx, c).
    w: Tensor,
    b: Tensor,
}

impl Stem {
    /// `x`: NHWC input as a flat slice -> (N*OH*OW, 32) and (OH, OW).
    fn forward(&self, x: &[f32], n: usize, h: usize, w: usize) -> candle_core::Result<(Tensor, usize, usize)> {
        let (k, s, c) = (self.k, self.stride, 3);
        let (oh, ow) = (h.div_ceil(s), w.div_ceil(s));
        let (pt, pl) = (same_pad(h, k, s).0, same_pad(w, k, s).0);
        let cols = k * k * c;
        let mut im2col = vec![0f32; n * oh * ow * cols];
        im2col.par_chunks_mut(ow * cols).enumerate().for_each(|(row, out)| {
            let (img, oy) = (row / oh, row % oh);
            for ox in 0..ow {
                for ky in 0..k {
                    let Some(iy) = (oy * s + ky).checked_sub(pt).filter(|&y| y < h) else { continue };
                    for kx in 0..k {
                        let Some(ix) = (ox * s + kx).checked_sub(pl).filter(|&x| x < w) else { continue };
                        let src = ((img * h + iy) * w + ix) * c;
                        let dst = ox * cols + (ky * k + kx) * c;
                        out[dst..dst + c].copy_from_slice(&x[src..src + c]);
                    }
                }
            }
        });
        let cols_t = Tensor::from_vec(im2col, (n * oh * ow, cols), &Device::Cpu)?;
        let y = cols_t.matmul(&self.w)?.broadcast_add(&self.b)?.clamp(0f32, 6f32)?;
        Ok((y, oh, ow))
    }
}

struct Block {
    expand: Option<Pointwise>,
    depthwise: Depthwise,
    project: Pointwise,
    residual: bool,
}

pub struct EfficientNetLite0 {
    stem: Stem,
    blocks: Vec<Block>,
    head: Pointwise,
    /// `(1280, 1000)` and `(1000,)`: ImageNet classifier.
    fc_w: Tensor,
    fc_b: Tensor,
}

impl std::fmt::Debug for EfficientNetLite0 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EfficientNetLite0").field("blocks", &self.blocks.len()).finish_non_exhaustive()
    }
}

/// Reads a PyTorch-named checkpoint and folds each BatchNorm into the conv
/// before it.
struct Weights(HashMap<String, Tensor>);

impl Weights {
    fn get(&self, name: &str, dims: &[usize]) -> Result<Vec<f32>, ImageModelError> {
        let t =
            self.0.get(name).ok_or_else(|| ImageModelError::Weight { name: name.into(), reason: "missing".into() })?;
        if t.dims() != dims {
            return Err(ImageModelError::Weight {
                name: name.into(),
                reason: format!("shape {:?}, expected {dims:?}", t.dims()),
            });
        }
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Conv weight `(O, I, k, k)` scaled per output channel by its BN, and
    /// the folded bias.
    fn conv_bn(&self, conv: &str, bn: &str, dims: [usize; 4]) -> Result<(Vec<f32>, Vec<f32>), ImageModelError> {
        let o = dims[0];
        let mut w = self.get(&format!("{conv}.weight"), &dims)?;
        let gamma = self.get(&format!("{bn}.weight"), &[o])?;
        let beta = self.get(&format!("{bn}.bias"), &[o])?;
        let mean = self.get(&format!("{bn}.running_mean"), &[o])?;
        let var = self.get(&format!("{bn}.running_var"), &[o])?;
        let per = w.len() / o;
        let mut bias = vec![0f32; o];
        for oc in 0..o {
            let scale = gamma[oc] as f64 / (var[oc] as f64 + BN_EPS).sqrt();
            for v in &mut w[oc * per..(oc + 1) * per] {
                *v = (*v as f64 * scale) as f32;
            }
            bias[oc] = (beta[oc] as f64 - mean[oc] as f64 * scale) as f32;
        }
        Ok((w, bias))
    }

    fn pointwise(&self, conv: &str, bn: &str, i: usize, o: usize) -> Result<Pointwise, ImageModelError> {
        let (w, b) = self.conv_bn(conv, bn, [o, i, 1, 1])?;
        // (O, I) -> (I, O) so activations (M, I) multiply on the left.
        let w = Tensor::from_vec(w, (o, i), &Device::Cpu)?.t()?.contiguous()?;
        Ok(Pointwise { w, b: Tensor::from_vec(b, (1, o), &Device::Cpu)? })
    }
}

impl EfficientNetLite0 {
    /// Loads `model.safetensors` (converted by scripts/setup-models.sh)
    /// from `dir`.
    pub fn load(dir: &Path) -> Result<Self, ImageModelError> {
        let path = dir.join("model.safetensors");
        let bytes =
            std::fs::read(&path).map_err(|source| ImageModelError::Io { path: path.display().to_string(), source })?;
        Self::from_safetensors(&bytes)
    }

    /// Builds the network from the bytes of its safetensors file.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, ImageModelError> {
        let weights = Weights(candle_core::safetensors::load_buffer(bytes, &Device::Cpu)?);

        let (w, b) = weights.conv_bn("_conv_stem", "_bn0", [32, 3, 3, 3])?;
        // (O, C, ky, kx) -> rows (ky, kx, c), columns o.
        let mut stem_w = vec![0f32; 27 * 32];
        for o in 0..32 {
            for c in 0..3 {
                for ky in 0..3 {
                    for kx in 0..3 {
                        stem_w[((ky * 3 + kx) * 3 + c) * 32 + o] = w[((o * 3 + c) * 3 + ky) * 3 + kx];
                    }
                }
            }
        }
        let stem = Stem {
            k: 3,
            stride: 2,
            w: Tensor::from_vec(stem_w, (27, 32), &Device::Cpu)?,
            b: Tensor::from_vec(b, (1, 32), &Device::Cpu)?,
        };

        let mut blocks = Vec::new();
        for (repeats, k, stride, expand, cin, cout) in STAGES {
            for r in 0..repeats {
                let (s, i) = if r == 0 { (stride, cin) } else { (1, cout) };
                let p = format!("_blocks.{}.", blocks.len());
                let mid = i * expand;
                let expand_conv = if expand == 1 {
                    None
                } else {
                    Some(weights.pointwise(&format!("{p}_expand_conv"), &format!("{p}_bn0"), i, mid)?)
                };
                let (dw, db) = weights.conv_bn(&format!("{p}_depthwise_conv"), &format!("{p}_bn1"), [mid, 1, k, k])?;
                let mut w = vec![0f32; k * k * mid];
                for c in 0..mid {
                    for t in 0..k * k {
                        w[t * mid + c] = dw[c * k * k + t];
                    }
                }
                blocks.push(Block {
                    expand: expand_conv,
                    depthwise: Depthwise { k, stride: s, channels: mid, w, b: db },
                    project: weights.pointwise(&format!("{p}_project_conv"), &format!("{p}_bn2"), mid, cout)?,
                    residual: s == 1 && i == cout,
                });
            }
        }
        let head = weights.pointwise("_conv_head", "_bn1", 320, DIM)?;
        let fc_w =
            Tensor::from_vec(weights.get("_fc.weight", &[1000, DIM])?, (1000, DIM), &Device::Cpu)?.t()?.contiguous()?;
        let fc_b = Tensor::from_vec(weights.get("_fc.bias", &[1000])?, (1, 1000), &Device::Cpu)?;
        Ok(Self { stem, blocks, head, fc_w, fc_b })
    }

    /// Pooled 1280-d vectors of a batch of preprocessed images, each
    /// `side x side x 3` (HWC) values, concatenated.
    pub fn embed(&self, pixels: &[f32], n: usize, side: usize) -> Result<Tensor, ImageModelError> {
        if side < 32 || pixels.len() != n * side * side * 3 {
            return Err(ImageModelError::Weight {
                name: "input".into(),
                reason: format!("{} values for {n} images", pixels.len()),
            });
        }
        let (mut x, mut h, mut w) = self.stem.forward(pixels, n, side, side)?;
        for block in &self.blocks {
            let input = x.clone();
            if let Some(e) = &block.expand {
                x = e.forward(&x, true)?;
            }
            let c = block.depthwise.channels;
            let y = x.reshape((n, h, w, c))?.apply_op1_no_bwd(&block.depthwise)?;
            (h, w) = (y.dim(1)?, y.dim(2)?);
            x = block.project.forward(&y.reshape((n * h * w, c))?, false)?;
            if block.residual {
                x = (x + input)?;
            }
        }
        let x = self.head.forward(&x, true)?;
        Ok(x.reshape((n, h * w, DIM))?.mean(1)?)
    }

    /// ImageNet logits `(N, 1000)` from pooled vectors.
    pub fn classify(&self, pooled: &Tensor) -> Result<Tensor, ImageModelError> {
        Ok(pooled.matmul(&self.fc_w)?.broadcast_add(&self.fc_b)?)
    }
}

#[cfg(test)]
mod tests {
    use super::same_pad;

    #[test]
    fn same_padding_puts_the_extra_pixel_at_the_end() {
        assert_eq!(same_pad(224, 3, 2), (0, 1));
        assert_eq!(same_pad(112, 5, 2), (1, 2));
        assert_eq!(same_pad(14, 5, 1), (2, 2));
        assert_eq!(same_pad(7, 3, 1), (1, 1));
    }
}
