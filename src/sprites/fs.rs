//! The filesystem API (`/v1/sprites/{name}/fs/…`). Paths are absolute paths inside the VM.

use bytes::Bytes;
use http::Method;

use super::client::{Body, Call, Idempotency, SpritesClient};
use super::error::Error;
use super::rest::decode;
use super::types::{FsEntry, FsList};

/// The working directory sent with every call, as the SDKs' default filesystem does.
const WORKING_DIR: &str = "/";

/// Query of a write, in the order the SDKs send it.
pub(crate) fn write_query(path: &str, mode: u32, mkdir_parents: bool) -> Vec<(&'static str, String)> {
    vec![
        ("path", path.to_string()),
        ("workingDir", WORKING_DIR.to_string()),
        ("mode", format!("{:04o}", mode & 0o7777)),
        ("mkdirParents", mkdir_parents.to_string()),
    ]
}

fn path_query(path: &str) -> Vec<(&'static str, String)> {
    vec![
        ("path", path.to_string()),
        ("workingDir", WORKING_DIR.to_string()),
    ]
}

/// `dir/.keep`, the marker file the SDKs write to make a directory.
pub(crate) fn keep_file(dir: &str) -> String {
    format!("{}/.keep", dir.trim_end_matches('/'))
}

impl SpritesClient {
    fn fs_url(&self, name: &str, op: &str, query: Vec<(&'static str, String)>) -> url::Url {
        let mut url = self.url(&["sprites", name, "fs", op]);
        url.query_pairs_mut().extend_pairs(query);
        url
    }

    /// `GET fs/read`: the file's bytes.
    pub async fn read_file(&self, name: &str, path: &str) -> Result<Bytes, Error> {
        self.get(self.fs_url(name, "read", path_query(path))).await
    }

    /// `PUT fs/write`: replaces the file with `data` and sets its permission bits.
    pub async fn write_file(
        &self,
        name: &str,
        path: &str,
        data: impl Into<Bytes>,
        mode: u32,
        mkdir_parents: bool,
    ) -> Result<(), Error> {
        let url = self.fs_url(name, "write", write_query(path, mode, mkdir_parents));
        self.call(Call {
            method: Method::PUT,
            url,
            body: Body::Octets(data.into()),
            timeout: self.inner.timeouts.request,
            idempotency: Idempotency::Idempotent,
            create_name: None,
        })
        .await
        .map(drop)
    }

    /// `GET fs/list`: a directory's children, or the one entry of a file.
    pub async fn list_dir(&self, name: &str, path: &str) -> Result<Vec<FsEntry>, Error> {
        let url = self.fs_url(name, "list", path_query(path));
        let body = self.get(url.clone()).await?;
        Ok(decode::<FsList>(&url, &body)?.entries)
    }

    /// `DELETE fs/delete`; a missing path gives [`Error::NotFound`].
    pub async fn delete_path(&self, name: &str, path: &str, recursive: bool) -> Result<(), Error> {
        let mut query = path_query(path);
        query.push(("recursive", recursive.to_string()));
        self.delete(self.fs_url(name, "delete", query)).await
    }

    /// `mkdir -p`. The API has no mkdir: like the SDKs, write `DIR/.keep` with parents, then
    /// delete the marker.
    pub async fn mkdir_p(&self, name: &str, dir: &str) -> Result<(), Error> {
        let keep = keep_file(dir);
        self.write_file(name, &keep, Bytes::new(), 0o644, true).await?;
        match self.delete_path(name, &keep, false).await {
            Ok(()) | Err(Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_query_golden() {
        let client = SpritesClient::new("http://h", "t").expect("client");
        let url = client.fs_url("vm", "write", write_query("/workspace/a b", 0o100755, true));
        assert_eq!(
            url.as_str(),
            "http://h/v1/sprites/vm/fs/write?path=%2Fworkspace%2Fa+b&workingDir=%2F&mode=0755&mkdirParents=true"
        );
        assert_eq!(keep_file("/workspace/x/"), "/workspace/x/.keep");
    }
}
