"""Files in, pixels and identity out: finding DICOM files, reading their headers and pixels, the
domain gates, the display preview."""
