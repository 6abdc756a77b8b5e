"""Images in: the sync from storage, the labeled index, labels files, decoding and the decode-once cache."""
