"""Delta: asymmetric private/public flows (Niu et al., CVPR 2024, arXiv 2312.05264)."""
