//! In-place encryption walker: turns a plaintext device into a LUKS2 volume chunk
//! by chunk, journaled in LUKS2's own reencryption metadata. Knows nothing of mounts.
