#!/usr/bin/env bash
# deploy-hetzner.sh: BatchSender on Hetzner Cloud in one command.
#
#   ./deploy-hetzner.sh [--dry-run] [--yes]
#
# 1. terraform apply (terraform/: network, firewall, load balancer, k3s servers and agents,
#    volumes, the backup bucket)       2. fetch the kubeconfig of the new cluster
# 3. the namespaces and the Secrets (created once, never overwritten)
# 4. the operators, the monitoring stack and NATS (k8s/helm/releases.txt, pinned)
# 5. k8s/overlays/production, phase by phase: foundation, data (and wait for it), the
#    migration Job (and wait for it), the application (and wait for its rollout), then
#    the workers' autoscaling
# 6. print the endpoints and the DNS records to create
#
# --dry-run prints every step and touches nothing (it renders the manifests locally, that
# is all it runs); --yes lets terraform apply without asking. Without --dry-run it refuses
# to start while a tool or a credential is missing, and names each one.
#
# Environment (credentials only from here; nothing secret is written to the repository):
#   HCLOUD_TOKEN                  Hetzner Cloud API token (read and write)
#   MINIO_USER, MINIO_PASSWORD    Hetzner Object Storage access key and secret (Cloud
#                                 Console > Object Storage > Security credentials)
#   BATCHSENDER_IMAGE             the image, by digest: registry/name@sha256:<64 hex>
#   BATCHSENDER_API_HOST          DNS name of the API, e.g. mail.example.com
#   BATCHSENDER_DASHBOARD_HOST    DNS name of the web dashboard, e.g. dashboard.example.com
#   ACME_EMAIL                    Let's Encrypt account e-mail (expiry notices)
#   KUBECONFIG_OUT                where to write the kubeconfig (default
#                                 ~/.kube/batchsender-<cluster>.yaml)
# and terraform/terraform.tfvars (copy terraform/terraform.tfvars.example): SSH keys and
# the operators' addresses.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TF_DIR="$ROOT/terraform"
K8S_DIR="$ROOT/k8s"
RELEASES="$K8S_DIR/helm/releases.txt"
NAMESPACE=batchsender
DRY_RUN=0
AUTO_APPROVE=0
TOOLS=(terraform kubectl helm ssh scp openssl)
CREDENTIALS=(HCLOUD_TOKEN MINIO_USER MINIO_PASSWORD BATCHSENDER_IMAGE BATCHSENDER_API_HOST
    BATCHSENDER_DASHBOARD_HOST ACME_EMAIL)

if [[ -t 1 ]]; then B=$'\e[1m' R=$'\e[31m' G=$'\e[32m' N=$'\e[0m'; else B='' R='' G='' N=''; fi

step() { printf '\n%s==> %s%s\n' "$B" "$*" "$N"; }
info() { printf '    %s\n' "$*"; }
die() { printf '%serror:%s %s\n' "$R" "$N" "$*" >&2; exit "${2:-1}"; }

# Run a command, or in a dry run only show it. Never pass a secret as an argument: the
# command line is printed (and visible in ps); secrets go through files or stdin.
run() {
    printf '    $'
    printf ' %q' "$@"
    printf '\n'
    if ((DRY_RUN)); then return 0; fi
    "$@"
}

usage() {
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
}

parse_args() {
    while (($#)); do
        case $1 in
            --dry-run) DRY_RUN=1 ;;
            --yes | -y) AUTO_APPROVE=1 ;;
            -h | --help) usage; exit 0 ;;
            *) usage >&2; die "unknown argument: $1" 2 ;;
        esac
        shift
    done
}

# --- preflight ---------------------------------------------------------------------------

preflight() {
    step "preflight: tools, credentials, terraform.tfvars"
    local missing=() name
    for name in "${TOOLS[@]}"; do
        command -v "$name" >/dev/null 2>&1 || missing+=("tool: $name")
    done
    for name in "${CREDENTIALS[@]}"; do
        [[ -n ${!name:-} ]] || missing+=("environment variable: $name")
    done
    if [[ -n ${BATCHSENDER_IMAGE:-} && ! $BATCHSENDER_IMAGE =~ ^[^@[:space:]]+@sha256:[0-9a-f]{64}$ ]]; then
        missing+=("BATCHSENDER_IMAGE must name the image by digest (name@sha256:<64 hex>), got '$BATCHSENDER_IMAGE'")
    fi
    for name in BATCHSENDER_API_HOST BATCHSENDER_DASHBOARD_HOST; do
        if [[ -n ${!name:-} && ! ${!name} =~ ^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$ ]]; then
            missing+=("$name must be a DNS name, got '${!name}'")
        fi
    done
    [[ -f $TF_DIR/terraform.tfvars ]] ||
        missing+=("file: terraform/terraform.tfvars (copy terraform/terraform.tfvars.example)")
    if ((${#missing[@]})); then
        local line
        for line in "${missing[@]}"; do printf '    %smissing:%s %s\n' "$R" "$N" "$line" >&2; done
        if ((DRY_RUN)); then
            info "(dry run: going on to show the steps; a real run stops here)"
        else
            die "cannot deploy: ${#missing[@]} thing(s) missing (above)" 2
        fi
    else
        info "${G}ok${N}: ${TOOLS[*]}; ${CREDENTIALS[*]}; terraform.tfvars"
    fi
}

# --- 1. infrastructure -------------------------------------------------------------------

tf_output() {
    if ((DRY_RUN)); then printf '<%s>' "$1"; return; fi
    terraform -chdir="$TF_DIR" output -raw "$1"
}

infrastructure() {
    step "1. infrastructure: terraform apply (terraform/)"
    run terraform -chdir="$TF_DIR" init -input=false
    local approve=()
    ((AUTO_APPROVE)) && approve=(-auto-approve)
    run terraform -chdir="$TF_DIR" apply -input=false "${approve[@]}"
    CLUSTER=$(tf_output network_name)
    SERVER_IP=$(tf_output first_server_ipv4)
    LB_IP=$(tf_output load_balancer_ipv4)
    BACKUP_BUCKET=$(tf_output backup_bucket)
    BACKUP_ENDPOINT=$(tf_output backup_endpoint)
    info "cluster $CLUSTER, first server $SERVER_IP, load balancer $LB_IP"
}

# --- 2. kubeconfig -----------------------------------------------------------------------

kubeconfig() {
    step "2. kubeconfig of the new cluster"
    KUBECONFIG_OUT=${KUBECONFIG_OUT:-$HOME/.kube/batchsender-$CLUSTER.yaml}
    info "waiting for k3s on $SERVER_IP (cloud-init installs it)"
    local ssh_opts=(-o StrictHostKeyChecking=accept-new -o ConnectTimeout=10 -o BatchMode=yes)
    if ((!DRY_RUN)); then
        local tries=0
        until ssh "${ssh_opts[@]}" "root@$SERVER_IP" test -f /etc/rancher/k3s/k3s.yaml 2>/dev/null; do
            ((++tries > 90)) && die "k3s did not come up on $SERVER_IP within 15 minutes (ssh root@$SERVER_IP journalctl -u k3s)"
            sleep 10
        done
    fi
    run mkdir -p "$(dirname "$KUBECONFIG_OUT")"
    run scp "${ssh_opts[@]}" "root@$SERVER_IP:/etc/rancher/k3s/k3s.yaml" "$KUBECONFIG_OUT"
    run chmod 600 "$KUBECONFIG_OUT"
    run sed -i "s#https://127.0.0.1:6443#https://$SERVER_IP:6443#" "$KUBECONFIG_OUT"
    export KUBECONFIG=$KUBECONFIG_OUT
    run kubectl wait --for=condition=Ready nodes --all --timeout=15m
}

# --- 3. manifests, namespaces and Secrets ------------------------------------------------

# The production overlay with this installation's image digest, hosts, e-mail and bucket:
# a kustomization of its own in a temporary folder, around k8s/overlays/production.
render() {
    step "3. render k8s/overlays/production for this installation"
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    local overlay image_name image_digest
    overlay=$(realpath --relative-to="$WORK" "$K8S_DIR/overlays/production")
    image_name=${BATCHSENDER_IMAGE:-}; image_name=${image_name%@*}
    image_digest=${BATCHSENDER_IMAGE:-}; image_digest=${image_digest#*@}
    cat >"$WORK/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $overlay
images:
  - name: ghcr.io/batchsender/batchsender
    newName: ${image_name:-<image>}
    digest: ${image_digest:-sha256:<digest>}
patches:
  - target: {kind: ConfigMap, name: batchsender-config}
    patch: '[{"op": "replace", "path": "/data/PUBLIC_URL", "value": "https://${BATCHSENDER_API_HOST:-}"}]'
  - target: {kind: Ingress, name: batchsender}
    patch: '[{"op": "replace", "path": "/spec/rules/0/host", "value": "${BATCHSENDER_API_HOST:-}"},
             {"op": "replace", "path": "/spec/rules/1/host", "value": "${BATCHSENDER_DASHBOARD_HOST:-}"},
             {"op": "replace", "path": "/spec/tls/0/hosts", "value": ["${BATCHSENDER_API_HOST:-}", "${BATCHSENDER_DASHBOARD_HOST:-}"]}]'
  - target: {kind: Ingress, name: batchsender-metrics-blocked}
    patch: '[{"op": "replace", "path": "/spec/rules/0/host", "value": "${BATCHSENDER_API_HOST:-}"},
             {"op": "replace", "path": "/spec/tls/0/hosts", "value": ["${BATCHSENDER_API_HOST:-}"]}]'
  - target: {kind: ClusterIssuer}
    patch: '[{"op": "replace", "path": "/spec/acme/email", "value": "${ACME_EMAIL:-}"}]'
  - target: {kind: Cluster, name: batchsender-pg}
    patch: '[{"op": "replace", "path": "/spec/backup/barmanObjectStore/destinationPath", "value": "s3://${BACKUP_BUCKET}/postgres"},
             {"op": "replace", "path": "/spec/backup/barmanObjectStore/endpointURL", "value": "${BACKUP_ENDPOINT}"}]'
EOF
    MANIFESTS="$WORK/manifests.yaml"
    # Local only (no cluster is asked), so a dry run renders too: it shows what would be
    # applied.
    printf '    $ kubectl kustomize %q > %q\n' "$WORK" "$MANIFESTS"
    if command -v kubectl >/dev/null 2>&1; then
        kubectl kustomize "$WORK" >"$MANIFESTS"
        info "$(grep -c '^kind:' "$MANIFESTS") objects; image $(grep -m1 -o 'image: .*@sha256:.*' "$MANIFESTS" || echo '(none by digest)')"
    else
        info "(kubectl missing: not rendered)"
    fi
}

# Apply the rendered objects of one phase (label batchsender.io/deploy-phase).
apply_phase() {
    run kubectl apply --server-side --force-conflicts -f "$MANIFESTS" -l "batchsender.io/deploy-phase=$1"
}

# A Secret created once from generated or given values, never overwritten (a redeploy
# keeps the passwords the databases were set up with). Values go through a file.
# ensure_secret NAMESPACE NAME KEY=VALUE...
ensure_secret() {
    local namespace=$1 name=$2 keys=()
    shift 2
    local pair
    for pair in "$@"; do keys+=("${pair%%=*}"); done
    info "Secret $namespace/$name (keys: ${keys[*]}): created when missing, never overwritten"
    if ((DRY_RUN)); then return 0; fi
    if kubectl -n "$namespace" get secret "$name" >/dev/null 2>&1; then
        info "  exists: kept"
        return 0
    fi
    local env_file="$WORK/$name.env"
    (umask 077 && printf '%s\n' "$@" >"$env_file")
    kubectl -n "$namespace" create secret generic "$name" --from-env-file="$env_file"
    rm -f "$env_file"
}

random_hex() {
    if ((DRY_RUN)); then printf '<random>'; return; fi
    openssl rand -hex 32
}

namespaces_and_secrets() {
    step "4. namespaces and Secrets"
    apply_phase namespaces
    ensure_secret kube-system hcloud "token=${HCLOUD_TOKEN:-}" "network=$CLUSTER"
    ensure_secret monitoring grafana-admin "admin-user=admin" "admin-password=$(random_hex)"
    ensure_secret "$NAMESPACE" batchsender-app "UNSUBSCRIBE_SECRET=$(random_hex)" \
        "CREDENTIALS_KEYS=$(random_hex)"
    ensure_secret "$NAMESPACE" batchsender-clickhouse "password=$(random_hex)"
    ensure_secret "$NAMESPACE" batchsender-dragonfly "password=$(random_hex)"
    ensure_secret "$NAMESPACE" batchsender-backup-s3 "ACCESS_KEY_ID=${MINIO_USER:-}" \
        "ACCESS_SECRET_KEY=${MINIO_PASSWORD:-}"
}

# --- 4. Helm releases --------------------------------------------------------------------

helm_releases() {
    step "5. operators, monitoring and NATS (k8s/helm/releases.txt)"
    local release namespace chart repository version values ref
    while read -r release namespace chart repository version values; do
        [[ -z $release || $release == \#* ]] && continue
        if [[ $repository == oci://* ]]; then
            ref=("$repository/$chart")
        else
            ref=("$chart" --repo "$repository")
        fi
        run helm upgrade --install "$release" "${ref[@]}" --version "$version" \
            --namespace "$namespace" --create-namespace \
            --values "$K8S_DIR/helm/values/$values" --wait --timeout 15m
    done <"$RELEASES"
}

# --- 5. the manifests, phase by phase ------------------------------------------------------

manifests() {
    step "6. foundation and data (k8s/overlays/production)"
    apply_phase foundation
    apply_phase data
    info "waiting for PostgreSQL, ClickHouse, Dragonfly and NATS"
    run kubectl -n "$NAMESPACE" wait cluster.postgresql.cnpg.io/batchsender-pg \
        --for=condition=Ready --timeout=20m
    run kubectl -n "$NAMESPACE" wait clickhouseinstallation.clickhouse.altinity.com/batchsender \
        --for=jsonpath='{.status.status}'=Completed --timeout=20m
    run kubectl -n "$NAMESPACE" wait dragonfly.dragonflydb.io/batchsender-dragonfly \
        --for=jsonpath='{.status.phase}'=ready --timeout=10m
    run kubectl -n "$NAMESPACE" rollout status statefulset/nats --timeout=10m

    step "7. migration: the Job runs to completion before any new pod starts"
    run kubectl -n "$NAMESPACE" delete job batchsender-migrate --ignore-not-found --wait=true
    apply_phase migrate
    if ! run kubectl -n "$NAMESPACE" wait job/batchsender-migrate --for=condition=complete --timeout=15m; then
        kubectl -n "$NAMESPACE" logs job/batchsender-migrate --tail=50 >&2 || true
        die "the migration failed: nothing new was rolled out (the running pods are untouched)"
    fi

    step "8. the application, and its rollout"
    apply_phase app
    run kubectl -n "$NAMESPACE" rollout status deployment/batchsender-api --timeout=10m
    run kubectl -n "$NAMESPACE" rollout status deployment/batchsender-worker --timeout=10m
    local web_replicas=0
    ((DRY_RUN)) || web_replicas=$(kubectl -n "$NAMESPACE" get deployment batchsender-web -o jsonpath='{.spec.replicas}')
    if ((web_replicas > 0)); then
        run kubectl -n "$NAMESPACE" rollout status deployment/batchsender-web --timeout=10m
    else
        info "batchsender-web runs 0 replicas until 'batchsender web' exists (k8s/base/app/web.yaml)"
    fi

    step "9. the workers' autoscaling (their NATS consumer exists now)"
    apply_phase autoscale
}

endpoints() {
    step "done: endpoints"
    cat <<EOF
    DNS (create these):   ${BATCHSENDER_API_HOST:-<api host>} A $LB_IP
                          ${BATCHSENDER_DASHBOARD_HOST:-<dashboard host>} A $LB_IP
    API:                  https://${BATCHSENDER_API_HOST:-<api host>}/api  (webhooks: /webhooks/{provider})
    dashboard:            https://${BATCHSENDER_DASHBOARD_HOST:-<dashboard host>}/
    kubeconfig:           export KUBECONFIG=$KUBECONFIG_OUT
    an API key:           kubectl -n $NAMESPACE exec deploy/batchsender-api -- batchsender keys create --tenant demo
    Grafana:              kubectl -n monitoring port-forward svc/kube-prometheus-stack-grafana 3003:80
                          http://127.0.0.1:3003/d/batchsender/batchsender-monitoring
                          (admin password: kubectl -n monitoring get secret grafana-admin -o jsonpath='{.data.admin-password}' | base64 -d)
    Prometheus:           kubectl -n monitoring port-forward svc/kube-prometheus-stack-prometheus 9090
EOF
}

main() {
    parse_args "$@"
    cd "$ROOT"
    ((DRY_RUN)) && printf '%sdry run:%s every step is shown, nothing is changed\n' "$B" "$N"
    preflight
    infrastructure
    kubeconfig
    render
    namespaces_and_secrets
    helm_releases
    manifests
    endpoints
}

main "$@"
