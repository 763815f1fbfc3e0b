output "load_balancer_ipv4" {
  description = "Public IPv4 address of the load balancer: point the DNS A records of the API and dashboard hosts here."
  value       = hcloud_load_balancer.ingress.ipv4
}

output "load_balancer_ipv6" {
  description = "Public IPv6 address of the load balancer (AAAA records)."
  value       = hcloud_load_balancer.ingress.ipv6
}

output "control_plane_ipv4" {
  description = "Public IPv4 addresses of the k3s servers (SSH and the Kubernetes API from admin_cidrs)."
  value       = hcloud_server.control_plane[*].ipv4_address
}

output "worker_ipv4" {
  description = "Public IPv4 addresses of the k3s agents."
  value       = hcloud_server.worker[*].ipv4_address
}

output "kubernetes_api" {
  description = "URL of the Kubernetes API (the first server)."
  value       = "https://${hcloud_server.control_plane[0].ipv4_address}:6443"
}

output "network_name" {
  description = "Name of the private network (the hcloud Secret's network key)."
  value       = hcloud_network.cluster.name
}

output "backup_bucket" {
  description = "Object storage bucket of the PostgreSQL backups."
  value       = minio_s3_bucket.backups.bucket
}

output "backup_endpoint" {
  description = "S3 endpoint of the backup bucket."
  value       = "https://${var.object_storage_location}.your-objectstorage.com"
}

output "first_server_ipv4" {
  description = "Public IPv4 address of the first k3s server (deploy-hetzner.sh fetches the kubeconfig from it)."
  value       = hcloud_server.control_plane[0].ipv4_address
}
