"""Config overrides for a detector small enough to run in well under a second per image; tests layer on them."""

TINY_DETECTOR = {
    "vqvae_def#channels": [8, 8],
    "vqvae_def#num_res_channels": [8, 8],
    "vqvae_def#num_res_layers": 1,
    "vqvae_def#num_embeddings": 16,
    "vqvae_def#embedding_dim": 4,
    "transformer_def#embed_dim": 16,
    "transformer_def#num_layers": 1,
    "transformer_def#num_heads": 2,
    "num_samples": 2,
    "num_decodes": 2,
    "image_size": [32, 32],
}
