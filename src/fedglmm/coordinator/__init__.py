"""The coordinator: what runs on the coordinating side only, never imported by a site."""
