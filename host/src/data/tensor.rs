//! The one place where data becomes Burn tensors.

use burn::tensor::{Device, Int, Tensor, TensorData};

use super::Batch;

/// The images `[n, c, h, w]` and labels `[n]` of `batch` on `device`.
pub fn to_tensors(batch: &Batch, device: &Device) -> (Tensor<4>, Tensor<1, Int>) {
    let images = Tensor::<4>::from_data(TensorData::new(batch.images.clone(), batch.shape), device);
    let labels = Tensor::<1, Int>::from_data(
        TensorData::new(batch.labels.clone(), [batch.labels.len()]),
        device,
    );
    (images, labels)
}
