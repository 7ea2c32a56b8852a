python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site
cd /tmp
PYTHONFAULTHANDLER=1 python3 -m fuseport.client.cli serve --host 127.0.0.1 --port 50555 --store-dir /tmp/st --device cuda > /tmp/srv.log 2>&1 &
SP=$!
timeout 200 python3 - <<'PY'
import torch, time
from fuseport.client import Client
from fuseport.wire._local import wait_until_serving
wait_until_serving("127.0.0.1:50555")
def chain(x, y): return torch.sigmoid(x * y + 1.5).tanh() - x
with Client("127.0.0.1:50555", timeout=180) as c:
    key = c.register(chain, [torch.randn(8, 8), torch.randn(8, 8)])
    x, y = torch.randn(1000, 33), torch.randn(1000, 33)
    try:
        r = c.execute_detailed(key, [x, y], wait=True)
        print("path", r.path, r.reason, r.detail)
        print(c.describe(key))
    except Exception as e:
        print("ERR", repr(e))
PY
if kill -0 $SP 2>/dev/null; then echo "server alive"; kill $SP; sleep 3; fi
wait $SP; echo "server rc=$?"; tail -60 /tmp/srv.log
echo "=== standalone AOTI on cuda"
timeout 200 python3 - <<'PY'
import torch, tempfile, os, faulthandler
faulthandler.enable()
from torch.export import export, Dim
def f(x, y): return (torch.sigmoid(x * y + 1.5).tanh() - x,)
class M(torch.nn.Module):
    def forward(self, x, y): return f(x, y)
x = torch.randn(8, 8, device="cuda"); y = torch.randn(8, 8, device="cuda")
d = Dim.DYNAMIC
ep = export(M(), (x, y), dynamic_shapes=({0: d, 1: d}, {0: d, 1: d}))
path = torch._inductor.aoti_compile_and_package(ep, package_path="/tmp/m.pt2")
print("compiled", path)
for how in ("py", "c"):
    if how == "py":
        m = torch._inductor.aoti_load_package(path)
        print("py load ok", (m(x, y)[0] - f(x, y)[0]).abs().max())
    else:
        l = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, 0)
        print("c load ok")
        xs, ys = torch.randn(100, 33, device="cuda"), torch.randn(100, 33, device="cuda")
        r = l.boxed_run([xs, ys])
        print("c run ok", (r[0] - f(xs, ys)[0]).abs().max())
PY
echo "standalone rc=$?"
