"""Camera intrinsics, belt-plane homography, encoder scale, diverter geometry and latency."""
