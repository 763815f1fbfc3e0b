# The bucket for CloudNativePG's WAL archive and base backups (k8s/base/data/postgres.yaml),
# on Hetzner Object Storage (S3-compatible; made through its S3 API, not the hcloud API).
# Versioning keeps an overwritten or deleted backup object recoverable; CloudNativePG's
# retention policy (30 days) deletes old backups itself.
resource "minio_s3_bucket" "backups" {
  bucket         = var.backup_bucket
  acl            = "private"
  object_locking = false
}

resource "minio_s3_bucket_versioning" "backups" {
  bucket = minio_s3_bucket.backups.bucket

  versioning_configuration {
    status = "Enabled"
  }
}
