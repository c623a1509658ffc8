"""Files in, pixels and identity out: finding DICOM files, reading their headers and pixels, mapping
the pixel values to the model's range, the domain gates, the display preview."""
