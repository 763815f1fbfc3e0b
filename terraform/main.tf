locals {
  network_zone = "eu-central"
  subnet_cidr  = cidrsubnet(var.network_cidr, 8, 1)
  # Fixed private addresses: the first server is the one the others join.
  control_plane_ips = [for i in range(var.control_plane_count) : cidrhost(local.subnet_cidr, 10 + i)]
  worker_ips        = [for i in range(var.worker_count) : cidrhost(local.subnet_cidr, 100 + i)]
  labels = {
    cluster    = var.cluster_name
    managed-by = "terraform"
  }
}

# --- network ---------------------------------------------------------------------------

resource "hcloud_network" "cluster" {
  name     = var.cluster_name
  ip_range = var.network_cidr
  labels   = local.labels
}

resource "hcloud_network_subnet" "nodes" {
  network_id   = hcloud_network.cluster.id
  type         = "cloud"
  network_zone = local.network_zone
  ip_range     = local.subnet_cidr
}

# Public interfaces: SSH and the Kubernetes API from the operators' addresses only, ICMP.
# HTTP(S) never reaches a node's public address: the load balancer talks to the nodes over
# the private network, which this firewall does not filter.
resource "hcloud_firewall" "nodes" {
  name   = "${var.cluster_name}-nodes"
  labels = local.labels

  rule {
    description = "SSH from the operators"
    direction   = "in"
    protocol    = "tcp"
    port        = "22"
    source_ips  = var.admin_cidrs
  }

  rule {
    description = "Kubernetes API from the operators"
    direction   = "in"
    protocol    = "tcp"
    port        = "6443"
    source_ips  = var.admin_cidrs
  }

  rule {
    description = "ICMP (path MTU discovery, ping)"
    direction   = "in"
    protocol    = "icmp"
    source_ips  = ["0.0.0.0/0", "::/0"]
  }
}

resource "hcloud_ssh_key" "admin" {
  count      = length(var.ssh_public_keys)
  name       = "${var.cluster_name}-admin-${count.index}"
  public_key = var.ssh_public_keys[count.index]
  labels     = local.labels
}

# Servers of one group on different physical hosts (a spread group holds up to 10).
resource "hcloud_placement_group" "control_plane" {
  name   = "${var.cluster_name}-control-plane"
  type   = "spread"
  labels = local.labels
}

resource "hcloud_placement_group" "workers" {
  count  = ceil(var.worker_count / 10)
  name   = "${var.cluster_name}-workers-${count.index}"
  type   = "spread"
  labels = local.labels
}

# The join token of the cluster: in the state only (keep the state private: it is a secret).
resource "random_password" "k3s_token" {
  length  = 48
  special = false
}

# --- k3s servers -----------------------------------------------------------------------

# Each server's k3s data directory (etcd and its snapshots) on a volume of its own, so a
# server can be rebuilt or resized without losing its etcd member.
resource "hcloud_volume" "control_plane" {
  count    = var.control_plane_count
  name     = "${var.cluster_name}-control-plane-${count.index}"
  size     = var.control_plane_volume_size
  location = var.location
  format   = "ext4"
  labels   = local.labels
}

resource "hcloud_server" "control_plane" {
  count              = var.control_plane_count
  name               = "${var.cluster_name}-control-plane-${count.index}"
  server_type        = var.control_plane_type
  image              = var.server_image
  location           = var.location
  placement_group_id = hcloud_placement_group.control_plane.id
  firewall_ids       = [hcloud_firewall.nodes.id]
  ssh_keys           = hcloud_ssh_key.admin[*].id
  labels             = merge(local.labels, { role = "control-plane" })

  user_data = templatefile("${path.module}/templates/k3s-server.yaml.tftpl", {
    k3s_version  = var.k3s_version
    token        = random_password.k3s_token.result
    node_ip      = local.control_plane_ips[count.index]
    first_server = local.control_plane_ips[0]
    cluster_init = count.index == 0
    network_cidr = var.network_cidr
    volume_id    = hcloud_volume.control_plane[count.index].id
  })

  network {
    network_id = hcloud_network.cluster.id
    ip         = local.control_plane_ips[count.index]
  }

  public_net {
    ipv4_enabled = true
    ipv6_enabled = true
  }

  # A changed cloud-init template must not rebuild a running server (and its etcd member).
  lifecycle {
    ignore_changes = [user_data, image, ssh_keys]
  }

  depends_on = [hcloud_network_subnet.nodes]
}

resource "hcloud_volume_attachment" "control_plane" {
  count     = var.control_plane_count
  volume_id = hcloud_volume.control_plane[count.index].id
  server_id = hcloud_server.control_plane[count.index].id
  automount = false
}

# --- k3s agents ------------------------------------------------------------------------

resource "hcloud_server" "worker" {
  count              = var.worker_count
  name               = "${var.cluster_name}-worker-${count.index}"
  server_type        = var.worker_type
  image              = var.server_image
  location           = var.location
  placement_group_id = hcloud_placement_group.workers[floor(count.index / 10)].id
  firewall_ids       = [hcloud_firewall.nodes.id]
  ssh_keys           = hcloud_ssh_key.admin[*].id
  labels             = merge(local.labels, { role = "worker" })

  user_data = templatefile("${path.module}/templates/k3s-agent.yaml.tftpl", {
    k3s_version  = var.k3s_version
    token        = random_password.k3s_token.result
    node_ip      = local.worker_ips[count.index]
    first_server = local.control_plane_ips[0]
    network_cidr = var.network_cidr
  })

  network {
    network_id = hcloud_network.cluster.id
    ip         = local.worker_ips[count.index]
  }

  public_net {
    ipv4_enabled = true
    ipv6_enabled = true
  }

  lifecycle {
    ignore_changes = [user_data, image, ssh_keys]
  }

  depends_on = [hcloud_network_subnet.nodes, hcloud_server.control_plane]
}

# --- load balancer ---------------------------------------------------------------------

# The one public entry for HTTP(S): TCP to Traefik's NodePorts on the agents, over the
# private network, with the PROXY protocol (Traefik learns the client's address from it).
# TLS ends in Traefik (cert-manager's certificates), not here.
resource "hcloud_load_balancer" "ingress" {
  name               = "${var.cluster_name}-ingress"
  load_balancer_type = var.load_balancer_type
  location           = var.location
  labels             = local.labels
}

resource "hcloud_load_balancer_network" "ingress" {
  load_balancer_id = hcloud_load_balancer.ingress.id
  network_id       = hcloud_network.cluster.id
  ip               = cidrhost(local.subnet_cidr, 2)
  depends_on       = [hcloud_network_subnet.nodes]
}

resource "hcloud_load_balancer_target" "workers" {
  type             = "label_selector"
  load_balancer_id = hcloud_load_balancer.ingress.id
  label_selector   = "cluster=${var.cluster_name},role=worker"
  use_private_ip   = true
  depends_on       = [hcloud_load_balancer_network.ingress]
}

resource "hcloud_load_balancer_service" "ingress" {
  for_each = {
    http  = { listen = 80, node_port = 30080 }
    https = { listen = 443, node_port = 30443 }
  }
  load_balancer_id = hcloud_load_balancer.ingress.id
  protocol         = "tcp"
  listen_port      = each.value.listen
  destination_port = each.value.node_port
  proxyprotocol    = true

  health_check {
    protocol = "tcp"
    port     = each.value.node_port
    interval = 10
    timeout  = 5
    retries  = 3
  }
}
