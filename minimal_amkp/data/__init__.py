"""Shell: the data. The ChestX-ray14 files (reader and writers), the images, and the phantom."""
