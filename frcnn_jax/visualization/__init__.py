"""Drawing detections on images."""
