"""Networks: the PixNerd pixel neural-field DiT and the frozen DINOv2 teacher."""
