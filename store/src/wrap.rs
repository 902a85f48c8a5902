//! [`StoreWrapper`]: a store that forwards to another and changes only
//! some calls (the index that follows writes, tests that gate, fail or
//! record calls), so it states only what it changes.

use async_trait::async_trait;

use crate::{
    CurrentVersion, EmbeddingStore, FailureRecord, FilledRow, RowRead, ScanCursor, ScanPage, StoreError, StoredRow,
};

/// Implement this instead of [`EmbeddingStore`] for a wrapper: every call
/// it does not override is forwarded to [`StoreWrapper::inner`], including
/// `get_each` and `put_filled`, whose trait defaults would otherwise
/// silently replace the inner store's own (per-key reads on CQL, the
/// delete check of the embedded store). Every `StoreWrapper` is an
/// `EmbeddingStore`.
#[async_trait]
pub trait StoreWrapper: Send + Sync + 'static {
    /// The store the calls go to.
    fn inner(&self) -> &dyn EmbeddingStore;

    async fn get_many(&self, model: &str, keys: &[String]) -> Result<Vec<Option<StoredRow>>, StoreError> {
        self.inner().get_many(model, keys).await
    }
    async fn get_each(&self, model: &str, keys: &[String], sink: &mut (dyn FnMut(usize, RowRead) + Send)) {
        self.inner().get_each(model, keys, sink).await
    }
    async fn put_vectors(&self, model: &str, rows: Vec<(String, Vec<f32>)>) -> Result<(), StoreError> {
        self.inner().put_vectors(model, rows).await
    }
    async fn put_failures(&self, model: &str, rows: Vec<(String, FailureRecord)>) -> Result<(), StoreError> {
        self.inner().put_failures(model, rows).await
    }
    async fn put_filled(&self, model: &str, rows: Vec<FilledRow>) -> Result<Vec<bool>, StoreError> {
        self.inner().put_filled(model, rows).await
    }
    async fn delete(&self, model: &str, keys: &[String]) -> Result<(), StoreError> {
        self.inner().delete(model, keys).await
    }
    async fn scan(&self, model: &str, cursor: Option<ScanCursor>, page: usize) -> Result<ScanPage, StoreError> {
        self.inner().scan(model, cursor, page).await
    }
    async fn count_vectors(&self, model: &str) -> Result<u64, StoreError> {
        self.inner().count_vectors(model).await
    }
    async fn purge(&self, model: &str, keys: &[String]) -> Result<(), StoreError> {
        self.inner().purge(model, keys).await
    }
    async fn copy_vectors(&self, model: &str, rows: Vec<(String, Vec<f32>)>) -> Result<u64, StoreError> {
        self.inner().copy_vectors(model, rows).await
    }
    async fn current_version(&self, name: &str) -> Result<Option<CurrentVersion>, StoreError> {
        self.inner().current_version(name).await
    }
    async fn set_current_version(&self, name: &str, version: &str) -> Result<(), StoreError> {
        self.inner().set_current_version(name, version).await
    }
}

#[async_trait]
impl<W: StoreWrapper> EmbeddingStore for W {
    async fn get_many(&self, model: &str, keys: &[String]) -> Result<Vec<Option<StoredRow>>, StoreError> {
        StoreWrapper::get_many(self, model, keys).await
    }
    async fn get_each(&self, model: &str, keys: &[String], sink: &mut (dyn FnMut(usize, RowRead) + Send)) {
        StoreWrapper::get_each(self, model, keys, sink).await
    }
    async fn put_vectors(&self, model: &str, rows: Vec<(String, Vec<f32>)>) -> Result<(), StoreError> {
        StoreWrapper::put_vectors(self, model, rows).await
    }
    async fn put_failures(&self, model: &str, rows: Vec<(String, FailureRecord)>) -> Result<(), StoreError> {
        StoreWrapper::put_failures(self, model, rows).await
    }
    async fn put_filled(&self, model: &str, rows: Vec<FilledRow>) -> Result<Vec<bool>, StoreError> {
        StoreWrapper::put_filled(self, model, rows).await
    }
    async fn delete(&self, model: &str, keys: &[String]) -> Result<(), StoreError> {
        StoreWrapper::delete(self, model, keys).await
    }
    async fn scan(&self, model: &str, cursor: Option<ScanCursor>, page: usize) -> Result<ScanPage, StoreError> {
        StoreWrapper::scan(self, model, cursor, page).await
    }
    async fn count_vectors(&self, model: &str) -> Result<u64, StoreError> {
        StoreWrapper::count_vectors(self, model).await
    }
    async fn purge(&self, model: &str, keys: &[String]) -> Result<(), StoreError> {
        StoreWrapper::purge(self, model, keys).await
    }
    async fn copy_vectors(&self, model: &str, rows: Vec<(String, Vec<f32>)>) -> Result<u64, StoreError> {
        StoreWrapper::copy_vectors(self, model, rows).await
    }
    async fn current_version(&self, name: &str) -> Result<Option<CurrentVersion>, StoreError> {
        StoreWrapper::current_version(self, name).await
    }
    async fn set_current_version(&self, name: &str, version: &str) -> Result<(), StoreError> {
        StoreWrapper::set_current_version(self, name, version).await
    }
}
