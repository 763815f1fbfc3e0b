terraform {
  required_version = ">= 1.6.0"

  required_providers {
    hcloud = {
      source  = "hetznercloud/hcloud"
      version = "1.52.0"
    }
    # Hetzner Object Storage is S3-compatible and not part of the hcloud API (nor of the
    # hcloud provider): its bucket is made through the S3 API with the MinIO provider.
    minio = {
      source  = "aminueza/minio"
      version = "3.3.0"
    }
    random = {
      source  = "hashicorp/random"
      version = "3.7.2"
    }
  }
}

# The API token from the environment (HCLOUD_TOKEN), never from a file.
provider "hcloud" {}

# The object storage keys from the environment (MINIO_USER, MINIO_PASSWORD: an access key
# and its secret made in the Cloud Console, Object Storage > Security credentials).
provider "minio" {
  minio_server = "${var.object_storage_location}.your-objectstorage.com"
  minio_region = var.object_storage_location
  minio_ssl    = true
}
