//! The `Blocks` service: other nodes replicate blocks here and fetch them.

use std::sync::Arc;

use migfs_proto::block::blocks_server::Blocks;
use migfs_proto::block::{GetBlockReply, GetBlockRequest, PutBlocksReply, PutBlocksRequest};
use migfs_proto::ids::BlockHash;
use tonic::{Request, Response, Status};

use super::BlockStore;

/// The service over this node's store.
#[derive(Debug, Clone)]
pub struct BlockService {
    store: Arc<BlockStore>,
}

impl BlockService {
    /// Serves `store`.
    pub fn new(store: Arc<BlockStore>) -> BlockService {
        BlockService { store }
    }
}

fn hash_of(b: &[u8]) -> Result<BlockHash, Status> {
    BlockHash::try_from(b).map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl Blocks for BlockService {
    async fn put_blocks(
        &self,
        req: Request<PutBlocksRequest>,
    ) -> Result<Response<PutBlocksReply>, Status> {
        let blocks = req.into_inner().blocks;
        let mut checked = Vec::with_capacity(blocks.len());
        for b in blocks {
            let h = hash_of(&b.hash)?;
            if BlockHash::of(&b.data) != h {
                return Err(Status::data_loss(format!(
                    "block {h}: bytes do not match the name"
                )));
            }
            checked.push((h, b.data));
        }
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || {
            for (h, d) in &checked {
                store.local.put(h, d)?;
            }
            Ok::<_, crate::error::FsError>(())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| match e.errno() {
            libc::ENOSPC => Status::resource_exhausted(e.to_string()),
            _ => Status::internal(e.to_string()),
        })?;
        Ok(Response::new(PutBlocksReply {
            node_id: self.store.node_id(),
        }))
    }

    async fn get_block(
        &self,
        req: Request<GetBlockRequest>,
    ) -> Result<Response<GetBlockReply>, Status> {
        let h = hash_of(&req.into_inner().hash)?;
        if let Some(d) = self.store.cache.get(&h) {
            return Ok(Response::new(GetBlockReply { data: d }));
        }
        let store = Arc::clone(&self.store);
        let got = tokio::task::spawn_blocking(move || store.read_local_blocking(h))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        match got {
            Ok(Some(d)) => Ok(Response::new(GetBlockReply { data: d })),
            Ok(None) => Err(Status::not_found(format!("block {h} not here"))),
            Err(e) => Err(Status::data_loss(e.to_string())),
        }
    }
}
