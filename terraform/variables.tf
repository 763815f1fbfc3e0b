variable "cluster_name" {
  description = "Name of the cluster: prefix of every resource, and the private network's name."
  type        = string
  default     = "batchsender"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}[a-z0-9]$", var.cluster_name))
    error_message = "cluster_name: 3-32 lower-case letters, digits and hyphens, starting with a letter."
  }
}

variable "location" {
  description = "Hetzner Cloud location of the servers, volumes and load balancer (one location: volumes attach only within it)."
  type        = string
  default     = "fsn1"

  validation {
    condition     = contains(["fsn1", "nbg1", "hel1"], var.location)
    error_message = "location: one of fsn1, nbg1, hel1 (the eu-central network zone, where Object Storage is too)."
  }
}

variable "object_storage_location" {
  description = "Location of the Hetzner Object Storage bucket for the PostgreSQL backups (S3 endpoint <location>.your-objectstorage.com)."
  type        = string
  default     = "fsn1"

  validation {
    condition     = contains(["fsn1", "nbg1", "hel1"], var.object_storage_location)
    error_message = "object_storage_location: one of fsn1, nbg1, hel1."
  }
}

variable "backup_bucket" {
  description = "Name of the object storage bucket for the PostgreSQL WAL archive and base backups (globally unique at Hetzner)."
  type        = string
  default     = "batchsender-backups"

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$", var.backup_bucket))
    error_message = "backup_bucket: 3-63 lower-case letters, digits and hyphens (S3 bucket naming)."
  }
}

variable "k3s_version" {
  description = "k3s release installed on every node (Kubernetes 1.32: the version k8s/ is validated against)."
  type        = string
  default     = "v1.32.3+k3s1"

  validation {
    condition     = can(regex("^v1\\.[0-9]+\\.[0-9]+\\+k3s[0-9]+$", var.k3s_version))
    error_message = "k3s_version: a k3s release tag such as v1.32.3+k3s1."
  }
}

variable "control_plane_count" {
  description = "Number of k3s servers (embedded etcd): 1 for a trial, 3 for production (a quorum survives losing one)."
  type        = number
  default     = 3

  validation {
    condition     = contains([1, 3, 5], var.control_plane_count)
    error_message = "control_plane_count: 1, 3 or 5 (etcd needs an odd number)."
  }
}

variable "control_plane_type" {
  description = "Server type of the k3s servers (they also run the NATS, PostgreSQL and Dragonfly pods)."
  type        = string
  default     = "cpx41"

  validation {
    condition     = can(regex("^(cx|cpx|cax|ccx)[0-9]{2}$", var.control_plane_type))
    error_message = "control_plane_type: a Hetzner Cloud server type such as cpx41 or ccx33."
  }
}

variable "worker_count" {
  description = "Number of k3s agents for the API and worker pods. 50 worker pods request 50 cores: size this (and worker_type) for the maximum you want to reach; pods beyond the capacity stay Pending."
  type        = number
  default     = 3

  validation {
    condition     = var.worker_count >= 1 && var.worker_count <= 50 && floor(var.worker_count) == var.worker_count
    error_message = "worker_count: a whole number from 1 to 50."
  }
}

variable "worker_type" {
  description = "Server type of the k3s agents."
  type        = string
  default     = "cpx51"

  validation {
    condition     = can(regex("^(cx|cpx|cax|ccx)[0-9]{2}$", var.worker_type))
    error_message = "worker_type: a Hetzner Cloud server type such as cpx51 or ccx43."
  }
}

variable "server_image" {
  description = "Operating system image of every node."
  type        = string
  default     = "debian-12"
}

variable "control_plane_volume_size" {
  description = "Size in GB of the volume holding each k3s server's data directory (etcd, its snapshots), kept when a server is rebuilt."
  type        = number
  default     = 20

  validation {
    condition     = var.control_plane_volume_size >= 10 && var.control_plane_volume_size <= 10240
    error_message = "control_plane_volume_size: 10 to 10240 GB (Hetzner volume limits)."
  }
}

variable "ssh_public_keys" {
  description = "SSH public keys allowed to log in as root on every node (OpenSSH format)."
  type        = list(string)

  validation {
    condition     = length(var.ssh_public_keys) > 0 && alltrue([for key in var.ssh_public_keys : can(regex("^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp256) ", key))])
    error_message = "ssh_public_keys: at least one OpenSSH public key (ssh-ed25519, ssh-rsa or ecdsa-sha2-nistp256)."
  }
}

variable "admin_cidrs" {
  description = "Addresses (CIDRs) allowed to reach SSH (22) and the Kubernetes API (6443). Everything else reaches the cluster only through the load balancer (80, 443)."
  type        = list(string)

  validation {
    condition     = length(var.admin_cidrs) > 0 && alltrue([for cidr in var.admin_cidrs : can(cidrhost(cidr, 0))])
    error_message = "admin_cidrs: at least one CIDR, e.g. 203.0.113.7/32."
  }

  validation {
    condition     = !contains(var.admin_cidrs, "0.0.0.0/0") && !contains(var.admin_cidrs, "::/0")
    error_message = "admin_cidrs: not the whole internet; name the operators' addresses."
  }
}

variable "network_cidr" {
  description = "The private network; the nodes get addresses in its first /24 (the pods use k3s's 10.42.0.0/16, the services 10.43.0.0/16: keep clear of both)."
  type        = string
  default     = "10.0.0.0/16"

  validation {
    condition     = can(cidrhost(var.network_cidr, 0)) && !can(regex("^10\\.4[23]\\.", var.network_cidr))
    error_message = "network_cidr: a valid CIDR outside 10.42.0.0/16 and 10.43.0.0/16."
  }
}

variable "load_balancer_type" {
  description = "Load balancer type in front of Traefik (lb11: 25 targets, 10,000 connections)."
  type        = string
  default     = "lb11"

  validation {
    condition     = contains(["lb11", "lb21", "lb31"], var.load_balancer_type)
    error_message = "load_balancer_type: lb11, lb21 or lb31."
  }
}
